//! In-memory test harness for vhu back-ends and front-ends.
