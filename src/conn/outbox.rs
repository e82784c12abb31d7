//! The outbox: a bounded queue of frame references for a backlogged connection.
//!
//! A caught-up subscriber has no outbox; its frames go straight to the
//! socket. Only when a write would block does it get one, holding `Arc`
//! references to the shared frames (never copies) and the offset into the
//! first. It is flushed with one vectored write and dropped once empty.
//! The outbox belongs to one shard, so it needs no atomics.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use crate::hub::Frame;

/// Frames gathered into one vectored write.
pub const IOVECS_PER_WRITE_MAX: usize = 64;

#[derive(Debug)]
pub struct Outbox {
    frames: VecDeque<Arc<Frame>>,
    /// Bytes of `frames[0]` already written.
    offset: usize,
    /// Pending bytes: the sum of the frames' lengths minus `offset`.
    bytes: usize,
    /// When bytes last became pending or last made progress (shard ms);
    /// the write-stall deadline counts from here.
    pub progress_ms: u64,
    /// Since when `bytes` has been above the soft limit (0 = not above).
    pub over_soft_since_ms: u64,
}

impl Outbox {
    pub fn new(now_ms: u64) -> Outbox {
        Outbox {
            frames: VecDeque::new(),
            offset: 0,
            bytes: 0,
            progress_ms: now_ms,
            over_soft_since_ms: 0,
        }
    }

    /// Pending bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Queues `frame`, `offset` bytes of which were already written.
    pub fn push(&mut self, frame: Arc<Frame>, offset: usize) {
        debug_assert!(offset < frame.len() || frame.is_empty());
        if self.frames.is_empty() {
            self.offset = offset;
        } else {
            debug_assert_eq!(offset, 0, "only the first frame may be partly written");
        }
        self.bytes += frame.len() - offset;
        self.frames.push_back(frame);
    }

    /// Fills `iovecs` with the pending bytes, front first; returns how many
    /// slices were filled (at most `iovecs.len()`).
    pub fn gather<'a>(&'a self, iovecs: &mut [IoSlice<'a>]) -> usize {
        let mut count = 0;
        for (slot, frame) in iovecs.iter_mut().zip(self.frames.iter()) {
            let bytes = if count == 0 {
                &frame.bytes[self.offset..]
            } else {
                &frame.bytes[..]
            };
            *slot = IoSlice::new(bytes);
            count += 1;
        }
        count
    }

    /// Drops `written` bytes from the front.
    pub fn advance(&mut self, mut written: usize) {
        assert!(written <= self.bytes, "wrote more than was pending");
        self.bytes -= written;
        while written > 0 {
            let front = self.frames.front().expect("bytes pending");
            let left = front.len() - self.offset;
            if written < left {
                self.offset += written;
                return;
            }
            written -= left;
            self.offset = 0;
            self.frames.pop_front();
        }
        // Zero-length frames at the front are complete too.
        while self.frames.front().is_some_and(|f| f.is_empty()) {
            self.frames.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: &[u8]) -> Arc<Frame> {
        Frame::control(bytes)
    }

    #[test]
    fn partial_writes_resume_at_the_offset() {
        let mut outbox = Outbox::new(0);
        outbox.push(frame(b"hello"), 2);
        outbox.push(frame(b"world"), 0);
        assert_eq!(outbox.bytes(), 8);
        let mut iovecs = [IoSlice::new(&[]); 8];
        let count = outbox.gather(&mut iovecs);
        let joined: Vec<u8> = iovecs[..count].iter().flat_map(|s| s.to_vec()).collect();
        assert_eq!(joined, b"lloworld");
        outbox.advance(4);
        assert_eq!(outbox.bytes(), 4);
        let mut iovecs = [IoSlice::new(&[]); 8];
        outbox.gather(&mut iovecs);
        assert_eq!(&*iovecs[0], b"orld");
        outbox.advance(4);
        assert!(outbox.is_empty());
    }

    #[test]
    fn gather_is_bounded() {
        let mut outbox = Outbox::new(0);
        for _ in 0..100 {
            outbox.push(frame(b"0123456789"), 0);
        }
        let mut iovecs = [IoSlice::new(&[]); IOVECS_PER_WRITE_MAX];
        assert_eq!(outbox.gather(&mut iovecs), IOVECS_PER_WRITE_MAX);
        let mut few = [IoSlice::new(&[]); 3];
        assert_eq!(outbox.gather(&mut few), 3);
    }
}
