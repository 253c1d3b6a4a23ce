//! Shared code of the vhu example daemons and tools.
