//! Linux adapter for vhu: socket I/O with fd passing, guest memory mapping,
//! eventfds and the event loop that drive the core's engines. Every `unsafe`
//! line lives in [`sys`].

pub mod sys;
