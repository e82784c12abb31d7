//! Event ids: strictly increasing, also across restarts.
//!
//! An id is `(epoch_ms << 20) | n`: the epoch is the server's start time in
//! Unix milliseconds, `n` counts events within the epoch. When `n` would
//! overflow, the epoch moves forward to `max(now_ms, epoch_ms + 1)`, so ids
//! never repeat and never go backwards. A restarted server starts at its own
//! start time, which is above every id the previous run issued unless it
//! published more than 2^20 events per millisecond on average.

use std::time::{SystemTime, UNIX_EPOCH};

use super::EventId;

/// Bits of an id that count events within an epoch.
pub const COUNTER_BITS: u32 = 20;
const COUNTER_MAX: u64 = (1 << COUNTER_BITS) - 1;

/// Hands out ids. Owned by the hub's sequencer, under its lock.
#[derive(Debug)]
pub struct IdSequence {
    epoch_ms: u64,
    /// The counter of the next id within the epoch.
    next: u64,
}

impl IdSequence {
    /// A sequence whose epoch is now.
    pub fn starting_now() -> IdSequence {
        IdSequence {
            epoch_ms: now_ms(),
            next: 0,
        }
    }

    /// A sequence with a given epoch (tests).
    pub fn with_epoch(epoch_ms: u64) -> IdSequence {
        IdSequence { epoch_ms, next: 0 }
    }

    /// The lowest id this run can issue: any id below it is from an earlier run.
    pub fn first(&self) -> EventId {
        self.epoch_ms << COUNTER_BITS
    }

    /// The next id.
    pub fn next_id(&mut self) -> EventId {
        if self.next > COUNTER_MAX {
            self.epoch_ms = now_ms().max(self.epoch_ms + 1);
            self.next = 0;
        }
        let id = (self.epoch_ms << COUNTER_BITS) | self.next;
        self.next += 1;
        id
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_across_the_counter_rollover() {
        let mut ids = IdSequence::with_epoch(1_000);
        ids.next = COUNTER_MAX - 1;
        let a = ids.next_id();
        let b = ids.next_id();
        let c = ids.next_id();
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(c & COUNTER_MAX, 0, "the counter restarts in a new epoch");
    }

    #[test]
    fn a_later_start_is_above_every_earlier_id() {
        let mut earlier = IdSequence::with_epoch(5_000);
        let last = (0..1000).map(|_| earlier.next_id()).last().unwrap();
        let later = IdSequence::with_epoch(5_001);
        assert!(later.first() > last);
    }
}
