//! I/O backends: the only code that talks to the kernel's event interfaces.

pub mod uring;
