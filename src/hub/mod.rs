//! The hub: one sequencer, the history, and a feed into every shard.
//!
//! Publishing takes one lock: inside it the event gets its id, is encoded
//! into a [`Frame`], appended to the [`History`] and pushed into every
//! shard's bounded lock-free inbox. Doing all of that in one critical section
//! is what makes every shard see ids in order. After the lock, each shard is
//! woken (at most one wake-up syscall per shard while it is busy).
//!
//! A shard whose inbox is full does not lose the event silently: the push
//! failure sets the shard's `missed` flag and counts an overflow; the shard
//! then recovers the missing frames from history (or, if they were evicted
//! meanwhile, closes its subscribers so they reconnect and replay).
//!
//! Nothing here is touched per delivery: shards read their inbox, and the
//! lock is taken only per publish, per replay page and per resynchronisation.

mod frame;
mod history;
pub mod id;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crossbeam_queue::ArrayQueue;

pub use frame::{lines, EventId, Frame, Topic};
pub use history::{History, Page, Resume};

use crate::backend::Waker;
use id::IdSequence;

/// What one shard receives from the hub.
#[derive(Debug)]
pub struct ShardFeed {
    /// Frames in publish order; bounded.
    pub inbox: ArrayQueue<Arc<Frame>>,
    /// Set when a push failed: the shard must recover from history.
    pub missed: AtomicBool,
    /// Pushes that failed because the inbox was full.
    pub overflows: AtomicU64,
    pub waker: Waker,
}

#[derive(Debug)]
struct Sequencer {
    ids: IdSequence,
    /// The last sequence number issued (contiguous from 1).
    seq: u64,
    history: History,
}

/// The shared core: sequencer, history, shard feeds.
#[derive(Debug)]
pub struct Hub {
    sequencer: Mutex<Sequencer>,
    feeds: Box<[ShardFeed]>,
    /// The lowest id of this run; ids below it are from an earlier run.
    first_id: EventId,
    published: AtomicU64,
}

/// A read-only view of the history, held under the hub's lock.
pub struct HistoryGuard<'a>(MutexGuard<'a, Sequencer>);

impl std::ops::Deref for HistoryGuard<'_> {
    type Target = History;
    fn deref(&self) -> &History {
        &self.0.history
    }
}

impl Hub {
    pub fn new(
        wakers: Vec<Waker>,
        inbox_events: usize,
        history_events_max: usize,
        history_bytes_max: usize,
    ) -> Hub {
        let ids = IdSequence::starting_now();
        let first_id = ids.first();
        let feeds = wakers
            .into_iter()
            .map(|waker| ShardFeed {
                inbox: ArrayQueue::new(inbox_events),
                missed: AtomicBool::new(false),
                overflows: AtomicU64::new(0),
                waker,
            })
            .collect();
        Hub {
            sequencer: Mutex::new(Sequencer {
                ids,
                seq: 0,
                history: History::new(history_events_max, history_bytes_max, first_id),
            }),
            feeds,
            first_id,
            published: AtomicU64::new(0),
        }
    }

    pub fn feed(&self, shard: usize) -> &ShardFeed {
        &self.feeds[shard]
    }

    pub fn feeds(&self) -> &[ShardFeed] {
        &self.feeds
    }

    pub fn first_id(&self) -> EventId {
        self.first_id
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, Sequencer> {
        // A panic while holding the lock leaves the history consistent (every
        // mutation is a push or pop), so a poisoned lock is still usable.
        self.sequencer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The history, locked. Keep the guard short: publishers wait on it.
    pub fn history(&self) -> HistoryGuard<'_> {
        HistoryGuard(self.lock())
    }

    /// Publishes one event: assigns its id, encodes it once, records it in
    /// history and hands it to every shard. Returns the id.
    pub fn publish(&self, topics: Box<[Topic]>, event_type: Option<&str>, data: &str) -> EventId {
        let id = {
            let mut sequencer = self.lock();
            let id = sequencer.ids.next_id();
            sequencer.seq += 1;
            let frame = Arc::new(Frame::event(id, sequencer.seq, topics, event_type, data));
            sequencer.history.push(frame.clone());
            for feed in self.feeds.iter() {
                if feed.inbox.push(frame.clone()).is_err() {
                    feed.missed.store(true, Ordering::Release);
                    feed.overflows.fetch_add(1, Ordering::Relaxed);
                }
            }
            id
        };
        self.published.fetch_add(1, Ordering::Relaxed);
        for feed in self.feeds.iter() {
            feed.waker.wake();
        }
        id
    }
}
