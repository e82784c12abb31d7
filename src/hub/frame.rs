//! Frames: the exact bytes written to sockets, encoded once and shared.
//!
//! A published event becomes one immutable [`Frame`] behind an `Arc`. Every
//! subscriber on every shard is written these same bytes; an outbox holds a
//! reference, never a copy. Control output (response heads, heartbeats, the
//! gap signal) is a frame too, with id 0 and no topics, so one write path and
//! one outbox type serve everything a connection sends.

use std::sync::Arc;
use std::time::Instant;

/// An event id: decimal `u64` on the wire. See [`super::id`].
pub type EventId = u64;

/// A topic name. Shared between the frame, the history and the shard indexes.
pub type Topic = Arc<str>;

/// Bytes ready for the wire, plus what fan-out and replay need to route them.
#[derive(Debug)]
pub struct Frame {
    /// The event id, or 0 for control frames.
    pub id: EventId,
    /// Contiguous publish sequence number (1, 2, 3, ...) within this process,
    /// or 0 for control frames. Shards detect a missed event by a jump in it.
    pub seq: u64,
    /// Topics this event was published to (empty for control frames).
    pub topics: Box<[Topic]>,
    /// When the publish request was accepted, for publish-to-write latency.
    pub published_at: Instant,
    /// The SSE bytes.
    pub bytes: Box<[u8]>,
}

impl Frame {
    /// Encodes an event: `id:`, optional `event:`, one `data:` line per line
    /// of `data` (split on `\r\n`, `\r` or `\n`), and the blank line.
    ///
    /// The caller has validated `event_type` (no CR, LF or NUL).
    pub fn event(
        id: EventId,
        seq: u64,
        topics: Box<[Topic]>,
        event_type: Option<&str>,
        data: &str,
    ) -> Frame {
        debug_assert!(event_type.is_none_or(|t| !t.contains(['\r', '\n', '\0'])));
        let mut bytes = Vec::with_capacity(encoded_len(event_type, data));
        bytes.extend_from_slice(b"id: ");
        bytes.extend_from_slice(id.to_string().as_bytes());
        bytes.push(b'\n');
        if let Some(event_type) = event_type {
            bytes.extend_from_slice(b"event: ");
            bytes.extend_from_slice(event_type.as_bytes());
            bytes.push(b'\n');
        }
        for line in lines(data) {
            bytes.extend_from_slice(b"data: ");
            bytes.extend_from_slice(line.as_bytes());
            bytes.push(b'\n');
        }
        bytes.push(b'\n');
        Frame {
            id,
            seq,
            topics,
            published_at: Instant::now(),
            bytes: bytes.into_boxed_slice(),
        }
    }

    /// A control frame: bytes that are not an event.
    pub fn control(bytes: impl Into<Box<[u8]>>) -> Arc<Frame> {
        Arc::new(Frame {
            id: 0,
            seq: 0,
            topics: Box::new([]),
            published_at: Instant::now(),
            bytes: bytes.into(),
        })
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// True if this event was published to any of `topics`.
    pub fn matches(&self, topics: &[Topic]) -> bool {
        self.topics.iter().any(|t| topics.contains(t))
    }
}

/// An upper bound of the encoded size (exact unless `data` has `\r\n` pairs).
fn encoded_len(event_type: Option<&str>, data: &str) -> usize {
    let line_count = 1 + data.bytes().filter(|&b| b == b'\n' || b == b'\r').count();
    "id: 18446744073709551615\n".len()
        + event_type.map_or(0, |t| "event: \n".len() + t.len())
        + line_count * "data: \n".len()
        + data.len()
        + 1
}

/// Splits SSE data into lines: `\r\n`, `\r` and `\n` each end a line, and the
/// text after the last terminator is a line too (so `""` is one empty line
/// and `"a\n"` is `"a"` then `""`, which a client joins back into `"a\n"`).
pub fn lines(data: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.find(['\r', '\n']) {
            None => {
                rest = None;
                Some(text)
            }
            Some(end) => {
                let skip = if text[end..].starts_with("\r\n") {
                    2
                } else {
                    1
                };
                rest = Some(&text[end + skip..]);
                Some(&text[..end])
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(event_type: Option<&str>, data: &str) -> String {
        let frame = Frame::event(42, 1, Box::new([]), event_type, data);
        String::from_utf8(frame.bytes.to_vec()).unwrap()
    }

    #[test]
    fn one_line() {
        assert_eq!(encode(None, "hello"), "id: 42\ndata: hello\n\n");
    }

    #[test]
    fn event_type_and_every_line_ending() {
        assert_eq!(
            encode(Some("tick"), "a\r\nb\rc\nd"),
            "id: 42\nevent: tick\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
    }

    #[test]
    fn empty_and_trailing_newline() {
        assert_eq!(encode(None, ""), "id: 42\ndata: \n\n");
        assert_eq!(encode(None, "a\n"), "id: 42\ndata: a\ndata: \n\n");
        assert_eq!(
            encode(None, "\r\n\r\n"),
            "id: 42\ndata: \ndata: \ndata: \n\n"
        );
    }

    #[test]
    fn size_estimate_is_an_upper_bound() {
        for data in ["", "x", "a\r\nb", "\n\n\n", "long line with words"] {
            let frame = Frame::event(u64::MAX, 1, Box::new([]), Some("t"), data);
            assert!(frame.len() <= encoded_len(Some("t"), data), "{data:?}");
        }
    }
}
