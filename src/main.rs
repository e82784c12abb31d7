//! The `plenum` binary: a thin dispatcher over the library's subcommands.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_arena_eager_commit` (see its `mimalloc.h`).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Commit arena memory as it is used, not up front: eager commit makes about
/// 11 MiB resident at start, which would dominate the memory of a lightly
/// loaded server. The option must be set before the first allocation, which
/// the Rust runtime makes before `main`; so this runs as an ELF constructor
/// with a priority, ahead of the runtime's initialisation.
extern "C" fn lazy_arena_commit() {
    // SAFETY: sets one allocator option; runs single-threaded before `main`.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

#[used]
#[link_section = ".init_array.00100"]
static LAZY_ARENA_COMMIT: extern "C" fn() = lazy_arena_commit;

fn main() -> ExitCode {
    let cli = plenum::cli::Cli::parse();
    match plenum::cli::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("plenum: {error:#}");
            ExitCode::FAILURE
        }
    }
}
