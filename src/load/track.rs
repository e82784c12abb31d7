//! Per-stream bookkeeping: sequence checks, latency, last event id.
//!
//! A [`StreamTracker`] lives in each connection slot and survives reconnects, so
//! sequences are checked across them. During a read it is paired with the
//! process-wide [`EventStats`] in a [`TrackerSink`], the [`SseSink`] that the
//! parser drives. It keeps only what the checks need (a few integers and the
//! last event id), never the event data.
//!
//! The sequence rules:
//! 1. An event whose data holds `seq=<n>` is sequenced; the first one on a slot
//!    sets the baseline.
//! 2. Each next seq must be the previous + 1. A larger one is a gap (the
//!    difference − 1 events are missing); one that is not larger is a duplicate
//!    (the previous seq is kept).
//! 3. An event of type `plenum-gap` is the server saying it cannot resume
//!    exactly: it is counted as a gap signal, not an error, and the next seq
//!    sets a new baseline (what it skipped is counted as `missing_signalled`).
//!
//! When the data also holds `ts=<unix-nanos>`, `now − ts` is recorded as the
//! publish-to-receive latency. Both tokens are found anywhere in any data line,
//! separated by ASCII whitespace.

use hdrhistogram::Histogram;
use smallvec::SmallVec;

use super::sse::SseSink;

/// Event type that Plenum sends when it cannot resume a stream exactly.
pub const GAP_EVENT_TYPE: &[u8] = b"plenum-gap";

/// Latency histogram range, in microseconds (1 µs to 1 hour).
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// Most latency windows kept per process (the chart's x axis resolution).
pub const WINDOWS_MAX: usize = 3600;

/// An event id; ids of up to 32 bytes stay inline.
pub type EventId = SmallVec<[u8; 32]>;

/// A new latency histogram in microseconds (3 significant digits).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static histogram bounds are valid")
}

/// A new per-window latency histogram (2 significant digits: 10x smaller).
pub fn window_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 2).expect("static histogram bounds are valid")
}

/// What a new seq means relative to the previous one on the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// The first seq on the slot (or the first after a gap signal).
    Baseline,
    /// Exactly the previous + 1.
    InOrder,
    /// Larger than previous + 1: this many events are missing.
    Gap { missing: u64 },
    /// Not larger than the previous one.
    Duplicate,
}

/// Applies the sequence rules to `seq`, updating `last`.
pub fn check_seq(last: &mut Option<u64>, seq: u64) -> SeqCheck {
    match *last {
        None => {
            *last = Some(seq);
            SeqCheck::Baseline
        }
        Some(previous) if seq <= previous => SeqCheck::Duplicate,
        Some(previous) => {
            *last = Some(seq);
            match seq - previous - 1 {
                0 => SeqCheck::InOrder,
                missing => SeqCheck::Gap { missing },
            }
        }
    }
}

/// Finds `seq=<n>` and `ts=<n>` tokens in one data line.
pub fn scan_seq_ts(line: &[u8], seq: &mut Option<u64>, ts: &mut Option<u64>) {
    for token in line.split(|byte| byte.is_ascii_whitespace()) {
        if seq.is_none() {
            if let Some(digits) = token.strip_prefix(b"seq=") {
                *seq = parse_decimal(digits);
            }
        }
        if ts.is_none() {
            if let Some(digits) = token.strip_prefix(b"ts=") {
                *ts = parse_decimal(digits);
            }
        }
    }
}

/// A non-empty run of ASCII digits that fits in a `u64`.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &digit| {
        if !digit.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// Per-slot stream state that survives reconnects.
#[derive(Debug, Default)]
pub struct StreamTracker {
    /// The stream's last event id (takes effect at each blank line).
    pub last_event_id: Option<EventId>,
    /// An `id` field seen in the current event, not yet in effect.
    pending_id: Option<EventId>,
    /// The server's last `retry` hint, in ms.
    pub retry_ms: Option<u32>,
    /// The last sequenced event's seq.
    last_seq: Option<u64>,
    /// The current event's `seq` and `ts`, if its data had them.
    pending_seq: Option<u64>,
    pending_ts: Option<u64>,
    /// The current event's type is `plenum-gap`.
    pending_is_gap: bool,
    /// A gap signal was received: the next seq sets a new baseline.
    rebaseline: bool,
    /// Events dispatched on this slot, across reconnects.
    pub events: u64,
}

impl StreamTracker {
    fn end_of_event(&mut self) {
        if let Some(id) = self.pending_id.take() {
            self.last_event_id = if id.is_empty() { None } else { Some(id) };
        }
        self.pending_seq = None;
        self.pending_ts = None;
        self.pending_is_gap = false;
    }

    /// Forgets the unfinished event of a stream that ended (per spec, an
    /// event not ended by a blank line is discarded).
    pub fn stream_ended(&mut self) {
        self.pending_id = None;
        self.pending_seq = None;
        self.pending_ts = None;
        self.pending_is_gap = false;
    }
}

/// Process-wide counters and histograms of received events.
#[derive(Debug)]
pub struct EventStats {
    /// Events dispatched (every type but the gap signal).
    pub events: u64,
    /// Events whose data held a `seq`.
    pub events_sequenced: u64,
    /// Gaps found (each one a jump past previous + 1).
    pub gaps: u64,
    /// Events missing in those gaps.
    pub missing: u64,
    /// Duplicates (a seq not above the previous one).
    pub duplicates: u64,
    /// `plenum-gap` events received.
    pub gap_signals: u64,
    /// Events skipped right after a gap signal (announced, so not errors).
    pub missing_signalled: u64,
    /// Events whose `ts` was in the future (clock skew); not recorded.
    pub latency_negative: u64,
    /// Publish-to-receive latency of every event with a `ts`, in µs.
    pub latency_us: Histogram<u64>,
    /// Latency of the current window, in µs.
    window_us: Histogram<u64>,
    /// Index of the current window.
    window_index: u64,
    /// Finished windows: (index, V2-serialized histogram, base64).
    pub windows: Vec<(u64, String)>,
    /// Unix time at which window 0 starts, in ns.
    run_start_unix_ns: u64,
    /// Window length, in ns.
    window_ns: u64,
}

impl EventStats {
    /// Empty statistics; windows are counted from `run_start_unix_ns`.
    pub fn new(run_start_unix_ns: u64, window_ns: u64) -> Self {
        assert!(window_ns > 0);
        EventStats {
            events: 0,
            events_sequenced: 0,
            gaps: 0,
            missing: 0,
            duplicates: 0,
            gap_signals: 0,
            missing_signalled: 0,
            latency_negative: 0,
            latency_us: latency_histogram(),
            window_us: window_histogram(),
            window_index: 0,
            windows: Vec::new(),
            run_start_unix_ns,
            window_ns,
        }
    }

    fn record_latency(&mut self, now_unix_ns: u64, ts_unix_ns: u64) {
        let Some(latency_ns) = now_unix_ns.checked_sub(ts_unix_ns) else {
            self.latency_negative += 1;
            return;
        };
        let latency_us = (latency_ns / 1000).max(1);
        self.latency_us.saturating_record(latency_us);
        let index = now_unix_ns.saturating_sub(self.run_start_unix_ns) / self.window_ns;
        if index > self.window_index {
            self.finish_window();
            self.window_index = index;
        }
        self.window_us.saturating_record(latency_us);
    }

    /// Moves the current window into `windows` (bounded by [`WINDOWS_MAX`]).
    pub fn finish_window(&mut self) {
        if self.window_us.is_empty() {
            return;
        }
        if self.windows.len() < WINDOWS_MAX {
            let encoded = super::report::encode_histogram(&self.window_us);
            self.windows.push((self.window_index, encoded));
        }
        self.window_us.reset();
    }
}

/// The sink the parser drives: one slot's tracker plus the process's stats.
pub struct TrackerSink<'a> {
    /// The slot's tracker.
    pub tracker: &'a mut StreamTracker,
    /// The process's statistics.
    pub stats: &'a mut EventStats,
    /// When the bytes being parsed were read, in Unix ns.
    pub now_unix_ns: u64,
}

impl SseSink for TrackerSink<'_> {
    fn data_line(&mut self, value: &[u8]) {
        let tracker = &mut *self.tracker;
        scan_seq_ts(value, &mut tracker.pending_seq, &mut tracker.pending_ts);
    }

    fn event_type(&mut self, value: &[u8]) {
        self.tracker.pending_is_gap = value == GAP_EVENT_TYPE;
    }

    fn id(&mut self, value: &[u8]) {
        self.tracker.pending_id = Some(EventId::from_slice(value));
    }

    fn retry(&mut self, milliseconds: u64) {
        self.tracker.retry_ms = Some(milliseconds.min(u64::from(u32::MAX)) as u32);
    }

    fn dispatch(&mut self) {
        let tracker = &mut *self.tracker;
        let stats = &mut *self.stats;
        if tracker.pending_is_gap {
            // A signal about the stream, not an event of it: not counted in `events`.
            stats.gap_signals += 1;
            tracker.rebaseline = true;
            tracker.end_of_event();
            return;
        }
        tracker.events += 1;
        stats.events += 1;
        if let Some(seq) = tracker.pending_seq {
            stats.events_sequenced += 1;
            let rebaseline = std::mem::take(&mut tracker.rebaseline);
            let previous = tracker.last_seq;
            match check_seq(&mut tracker.last_seq, seq) {
                SeqCheck::Baseline | SeqCheck::InOrder => {}
                SeqCheck::Gap { missing } if rebaseline => stats.missing_signalled += missing,
                SeqCheck::Gap { missing } => {
                    stats.gaps += 1;
                    stats.missing += missing;
                }
                SeqCheck::Duplicate => {
                    stats.duplicates += 1;
                    log::debug!("duplicate seq {seq} after {previous:?}");
                }
            }
            if let Some(ts) = tracker.pending_ts {
                stats.record_latency(self.now_unix_ns, ts);
            }
        }
        tracker.end_of_event();
    }

    fn discard(&mut self) {
        self.tracker.end_of_event();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::sse::SseParser;

    #[test]
    fn seq_rules() {
        let mut last = None;
        assert_eq!(check_seq(&mut last, 10), SeqCheck::Baseline);
        assert_eq!(check_seq(&mut last, 11), SeqCheck::InOrder);
        assert_eq!(check_seq(&mut last, 14), SeqCheck::Gap { missing: 2 });
        assert_eq!(check_seq(&mut last, 14), SeqCheck::Duplicate);
        assert_eq!(check_seq(&mut last, 3), SeqCheck::Duplicate);
        assert_eq!(
            last,
            Some(14),
            "a duplicate does not move the sequence back"
        );
        assert_eq!(check_seq(&mut last, 15), SeqCheck::InOrder);
    }

    #[test]
    fn scans_tokens() {
        let (mut seq, mut ts) = (None, None);
        scan_seq_ts(b"seq=12 ts=1700000000000000000 xxxx", &mut seq, &mut ts);
        assert_eq!((seq, ts), (Some(12), Some(1_700_000_000_000_000_000)));
        let (mut seq, mut ts) = (None, None);
        scan_seq_ts(b"seq=1x ts= topic=a", &mut seq, &mut ts);
        assert_eq!((seq, ts), (None, None));
        let (mut seq, mut ts) = (None, None);
        scan_seq_ts(b"hello", &mut seq, &mut ts);
        scan_seq_ts(b"\tts=5", &mut seq, &mut ts);
        scan_seq_ts(b"seq=99999999999999999999999", &mut seq, &mut ts);
        assert_eq!((seq, ts), (None, Some(5)));
    }

    /// Feeds `streams` (one per connection of the same slot) and returns the stats.
    fn run(streams: &[&[u8]]) -> (EventStats, StreamTracker) {
        let mut stats = EventStats::new(0, 1_000_000_000);
        let mut tracker = StreamTracker::default();
        for stream in streams {
            let mut parser = SseParser::default();
            let mut sink = TrackerSink {
                tracker: &mut tracker,
                stats: &mut stats,
                now_unix_ns: 5_000_000,
            };
            parser.feed(stream, &mut sink).unwrap();
            tracker.stream_ended();
        }
        (stats, tracker)
    }

    #[test]
    fn gaps_and_duplicates_in_one_stream() {
        let (stats, tracker) = run(&[b"data: seq=1\n\ndata: seq=2\n\ndata: seq=5\n\ndata: seq=5\n\ndata: seq=6\n\ndata: seq=4\n\n"]);
        assert_eq!((stats.events, stats.events_sequenced), (6, 6));
        assert_eq!((stats.gaps, stats.missing, stats.duplicates), (1, 2, 2));
        assert_eq!(tracker.events, 6);
    }

    #[test]
    fn sequences_continue_across_reconnects() {
        let (stats, tracker) = run(&[
            b"id: 1\ndata: seq=1\n\nid: 2\ndata: seq=2\n\nid: 3\ndata: seq=3\n",
            b"id: 3\ndata: seq=3\n\nid: 4\ndata: seq=4\n\n",
        ]);
        // The unfinished event 3 of the first stream was discarded, so the
        // last id was 2, and seq 3 on the second stream is in order.
        assert_eq!((stats.gaps, stats.duplicates, stats.events), (0, 0, 4));
        assert_eq!(tracker.last_event_id.as_deref(), Some(&b"4"[..]));
        let (stats, _) = run(&[b"data: seq=1\n\n", b"data: seq=3\n\n"]);
        assert_eq!(
            (stats.gaps, stats.missing),
            (1, 1),
            "a gap across a reconnect is a gap"
        );
    }

    #[test]
    fn gap_signal_rebaselines_without_error() {
        let (stats, _) = run(&[
            b"data: seq=1\n\n",
            b"event: plenum-gap\ndata: {\"reason\":\"too_old\"}\n\ndata: seq=50\n\ndata: seq=51\n\n",
        ]);
        assert_eq!(stats.gap_signals, 1);
        assert_eq!(
            (stats.gaps, stats.missing, stats.missing_signalled),
            (0, 0, 48)
        );
        assert_eq!(
            stats.events, 3,
            "the gap signal is not an event of the stream"
        );
    }

    #[test]
    fn latency_is_recorded_and_windowed() {
        let (stats, _) = run(&[b"data: seq=1 ts=3000000\n\ndata: seq=2 ts=9000000\n\n"]);
        assert_eq!(stats.latency_us.len(), 1);
        assert_eq!(stats.latency_us.max(), 2000);
        assert_eq!(stats.latency_negative, 1);
    }

    #[test]
    fn retry_and_ids_are_kept() {
        let (_, tracker) = run(&[b"retry: 250\nid: abc\n\n"]);
        assert_eq!(tracker.retry_ms, Some(250));
        assert_eq!(tracker.last_event_id.as_deref(), Some(&b"abc"[..]));
        let (_, tracker) = run(&[b"id: abc\ndata: x\n\nid\n\n"]);
        assert_eq!(
            tracker.last_event_id, None,
            "an empty id clears the last event id"
        );
    }
}
