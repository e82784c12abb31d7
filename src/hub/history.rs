//! The bounded history ring that `Last-Event-ID` replays from.
//!
//! Events are kept in publish order, bounded by count and by encoded bytes;
//! the oldest are evicted first. Because ids and sequence numbers both
//! increase, a position is found by binary search on the id (for a client's
//! `Last-Event-ID`) or by subtraction on the sequence number (for a shard
//! that missed events).

use std::collections::VecDeque;
use std::sync::Arc;

use super::{EventId, Frame, Topic};

/// Where a subscriber's `Last-Event-ID` leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Every event after the id is still here: replay from it, exactly.
    Exact,
    /// Some events after the id are gone (evicted, or from an earlier run).
    TooOld,
    /// Not an id this server issued: ahead of the newest event.
    Unknown,
}

/// A page of replay.
#[derive(Debug, Default)]
pub struct Page {
    /// Frames on the asked topics, in order.
    pub frames: Vec<Arc<Frame>>,
    /// The id up to which the history was scanned: continue after it.
    pub scanned_through: EventId,
    /// True if the scan reached the asked end.
    pub complete: bool,
}

#[derive(Debug)]
pub struct History {
    frames: VecDeque<Arc<Frame>>,
    /// Sum of `frames[i].len()`.
    bytes: usize,
    events_max: usize,
    bytes_max: usize,
    /// Every event with an id at or below this is gone: evicted, or issued
    /// by an earlier run. Starts just below this run's first id.
    evicted_through: EventId,
    /// The sequence number of the last evicted event (0 if none).
    evicted_seq: u64,
    /// The newest id issued, or `evicted_through` while none is.
    newest: EventId,
}

impl History {
    pub fn new(events_max: usize, bytes_max: usize, first_id: EventId) -> History {
        assert!(events_max > 0 && bytes_max > 0);
        History {
            frames: VecDeque::new(),
            bytes: 0,
            events_max,
            bytes_max,
            evicted_through: first_id.saturating_sub(1),
            evicted_seq: 0,
            newest: first_id.saturating_sub(1),
        }
    }

    pub fn push(&mut self, frame: Arc<Frame>) {
        assert!(frame.id > self.newest, "ids must increase");
        assert_eq!(
            frame.seq,
            self.evicted_seq + self.frames.len() as u64 + 1,
            "seq must be contiguous"
        );
        self.newest = frame.id;
        self.bytes += frame.len();
        self.frames.push_back(frame);
        while self.frames.len() > self.events_max
            || (self.bytes > self.bytes_max && self.frames.len() > 1)
        {
            let evicted = self.frames.pop_front().expect("not empty");
            self.bytes -= evicted.len();
            self.evicted_through = evicted.id;
            self.evicted_seq = evicted.seq;
        }
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The newest id issued (below this run's first id while none is).
    pub fn newest(&self) -> EventId {
        self.newest
    }

    /// The newest sequence number (0 while nothing was published).
    pub fn newest_seq(&self) -> u64 {
        self.evicted_seq + self.frames.len() as u64
    }

    /// Can a subscriber who has seen everything through `last` be continued exactly?
    pub fn resume(&self, last: EventId) -> Resume {
        if last > self.newest {
            Resume::Unknown
        } else if last < self.evicted_through {
            Resume::TooOld
        } else {
            Resume::Exact
        }
    }

    /// The oldest id still held minus one: replaying "after" it replays everything.
    pub fn before_oldest(&self) -> EventId {
        self.evicted_through
    }

    /// Frames on any of `topics` with `after < id <= through`, in order, until
    /// about `bytes_budget` bytes are collected (at least one frame).
    pub fn page(
        &self,
        after: EventId,
        through: EventId,
        topics: &[Topic],
        bytes_budget: usize,
    ) -> Page {
        let start = self.frames.partition_point(|f| f.id <= after);
        let mut page = Page {
            frames: Vec::new(),
            scanned_through: after,
            complete: true,
        };
        let mut bytes = 0;
        for frame in self.frames.range(start..) {
            if frame.id > through {
                break;
            }
            if bytes >= bytes_budget && !page.frames.is_empty() {
                page.complete = false;
                break;
            }
            if frame.matches(topics) {
                bytes += frame.len();
                page.frames.push(frame.clone());
            }
            page.scanned_through = frame.id;
        }
        if page.complete {
            page.scanned_through = through.max(after);
        }
        page
    }

    /// All frames with a sequence number above `seq`, for a shard that missed
    /// some; `None` if some of them were already evicted.
    pub fn after_seq(&self, seq: u64) -> Option<Vec<Arc<Frame>>> {
        if seq < self.evicted_seq {
            return None;
        }
        let skip = (seq - self.evicted_seq) as usize;
        Some(self.frames.iter().skip(skip).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(id: EventId, seq: u64, topic: &str) -> Arc<Frame> {
        Arc::new(Frame::event(
            id,
            seq,
            Box::new([Topic::from(topic)]),
            None,
            "0123456789",
        ))
    }

    fn filled(events_max: usize, bytes_max: usize) -> History {
        let mut history = History::new(events_max, bytes_max, 100);
        for i in 0..10u64 {
            history.push(frame(
                100 + i,
                i + 1,
                if i % 2 == 0 { "even" } else { "odd" },
            ));
        }
        history
    }

    #[test]
    fn bounded_by_count() {
        let history = filled(4, usize::MAX);
        assert_eq!(history.len(), 4);
        assert_eq!(history.resume(105), Resume::Exact);
        assert_eq!(history.resume(104), Resume::TooOld);
        assert_eq!(history.resume(110), Resume::Unknown);
        assert_eq!(
            history.resume(50),
            Resume::TooOld,
            "ids from an earlier run"
        );
    }

    #[test]
    fn bounded_by_bytes() {
        let one = frame(100, 1, "x").len();
        let history = filled(100, one * 3);
        assert_eq!(history.len(), 3);
        assert_eq!(history.bytes(), one * 3);
    }

    #[test]
    fn a_fresh_history_resumes_from_nothing() {
        let history = History::new(10, 1000, 100);
        assert_eq!(history.resume(99), Resume::Exact);
        assert_eq!(history.resume(98), Resume::TooOld);
        assert_eq!(history.resume(100), Resume::Unknown);
    }

    #[test]
    fn pages_filter_by_topic_and_stop_at_the_budget() {
        let history = filled(100, usize::MAX);
        let page = history.page(101, 109, &[Topic::from("odd")], usize::MAX);
        let ids: Vec<_> = page.frames.iter().map(|f| f.id).collect();
        assert_eq!(ids, [103, 105, 107, 109]);
        assert!(page.complete);

        let page = history.page(101, 109, &[Topic::from("odd")], 1);
        assert_eq!(page.frames.len(), 1);
        assert!(!page.complete);
        let rest = history.page(page.scanned_through, 109, &[Topic::from("odd")], usize::MAX);
        let ids: Vec<_> = rest.frames.iter().map(|f| f.id).collect();
        assert_eq!(ids, [105, 107, 109]);
    }

    #[test]
    fn missed_sequence_numbers_come_back_while_held() {
        let history = filled(4, usize::MAX);
        let seqs: Vec<_> = history
            .after_seq(7)
            .unwrap()
            .iter()
            .map(|f| f.seq)
            .collect();
        assert_eq!(seqs, [8, 9, 10]);
        assert!(history.after_seq(5).is_none());
        assert!(history.after_seq(10).unwrap().is_empty());
    }
}
