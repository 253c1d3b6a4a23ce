//! Thin, audited wrappers over libc. Every `unsafe` block of the adapter is
//! in this module and carries a `SAFETY:` comment.
