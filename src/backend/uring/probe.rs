//! Start-up probe: can this kernel (and this container) run the io_uring backend?

/// What the probe found out.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// Direct-descriptor slots one ring could register (the registered-table size probed).
    pub files_per_ring_max: u32,
    /// `SOCKET_URING_OP_SETSOCKOPT` is available (Linux 6.7+): stall closes can reset.
    pub socket_commands: bool,
}

/// Probes io_uring for everything the backend requires, asking for a
/// registered file table of `files_per_ring` slots. `Err` carries a one-line
/// reason fit for a log line ("io_uring_setup: EPERM (kernel.io_uring_disabled=2?)").
pub fn probe(files_per_ring: u32) -> Result<Capabilities, String> {
    let _ = files_per_ring;
    Err("io_uring probe not built yet".into())
}
