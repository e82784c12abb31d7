//! The io_uring backend (issue 3). For now only the start-up probe.

pub mod probe;
