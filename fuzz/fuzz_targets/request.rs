//! Fuzz target: the request path, from the bytes of a connection to the SSE
//! frame of a publish. The first input byte picks the limits, the second the
//! size of each simulated read (so the fuzzer also chooses the splits); the
//! rest is what the client sends. See `plenum::http::fuzz` for the steps and
//! the invariants asserted at each.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    plenum::http::fuzz::request_path(data);
});
