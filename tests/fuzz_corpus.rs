//! The fuzz target's committed corpus (`fuzz/corpus/request/`), replayed under
//! `cargo test` through the same driver the fuzz target uses
//! (`plenum::http::fuzz::request_path`), so every run exercises it even where
//! cargo-fuzz cannot run. Each input is also replayed with every read size from
//! 1 to 64 bytes: the outcome must not depend on how the bytes were split.
//!
//! A crash found by the fuzzer (`fuzz/artifacts/request/crash-*`) is fixed and
//! then added to the corpus, where this test keeps it fixed.

use std::path::Path;

use plenum::http::fuzz::{request_path, Outcome};

#[test]
fn every_corpus_input_plays_through_the_request_path_at_every_split() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/request");
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    entries.sort();
    assert!(
        entries.len() >= 30,
        "the seed corpus has shrunk to {} inputs",
        entries.len()
    );
    let mut totals = Outcome::default();
    let mut refusals = std::collections::BTreeSet::new();
    for path in &entries {
        let data = std::fs::read(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let outcome = std::panic::catch_unwind(|| request_path(&data)).unwrap_or_else(|_| {
            panic!("corpus input {name} broke an invariant (see the panic above)")
        });
        if data.len() > 2 {
            for read_size in 1..=64u8 {
                let mut resized = data.clone();
                resized[1] = read_size;
                let again = request_path(&resized);
                assert_eq!(
                    again, outcome,
                    "{name}: reads of {read_size} bytes changed the outcome"
                );
            }
        }
        totals.answered += outcome.answered;
        totals.frames += outcome.frames;
        totals.streamed |= outcome.streamed;
        totals.incomplete |= outcome.incomplete;
        refusals.extend(outcome.refused);
    }
    // The corpus keeps covering every branch of the path.
    assert!(
        totals.frames >= 5 && totals.answered > totals.frames,
        "{totals:?}"
    );
    assert!(totals.streamed && totals.incomplete, "{totals:?}");
    for status in [400, 401, 405, 413, 417, 431] {
        assert!(
            refusals.contains(&status),
            "no corpus input is refused with {status}: {refusals:?}"
        );
    }
}
