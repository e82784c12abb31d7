//! The request path as one function of bytes, for fuzzing and corpus replay.
//!
//! [`request_path`] plays a connection's input through exactly the steps the
//! shard takes (see `Shard::read_request` / `process_input`), with no sockets:
//!
//! 1. The first byte picks the limits (head, body, topics, a publish token),
//!    the second the size of each simulated `recv`, so one input also chooses
//!    where the stream is split.
//! 2. The rest is the connection's byte stream. Head bytes are read at most
//!    `head_bytes_max + 1` at a time, as the shard does, and parsed with
//!    [`parse_head`] (which also decodes the query: topics, event type,
//!    `lastEventID`).
//! 3. A publish reads its body with a [`BodyReader`] (`Content-Length` or
//!    chunked), then turns it into a [`Frame`] as the hub does.
//! 4. Keep-alive requests follow one another (pipelining); a stream, a
//!    refusal or a request without keep-alive ends the connection.
//!
//! Each input is played twice, split into reads of the chosen size and into
//! reads of the shard's size, and the two outcomes must agree.
//!
//! At each step the invariants the rest of the server relies on are asserted,
//! so a violation is a panic the fuzzer reports: heads within their limit,
//! topics and event types free of CR, LF and NUL, bodies within theirs,
//! refusals with a known status, and every frame parsing back (by the load
//! generator's independent WHATWG parser) to exactly one event with the
//! published id, type and data, line ends normalised, with no line other
//! than `id:`, `event:` and `data:`.
//!
//! Used by `fuzz/fuzz_targets/request.rs` (cargo-fuzz) and by
//! `tests/fuzz_corpus.rs`, which replays the committed corpus under `cargo test`.

use super::body::{BodyReader, ChunkedDecoder};
use super::request::{
    parse_head, BodyKind, Limits, Rejection, Route, EVENT_TYPE_BYTES_MAX, LAST_EVENT_ID_BYTES_MAX,
    TOPIC_BYTES_MAX,
};
use crate::hub::{Frame, Topic};
use crate::load::sse::{EventCollector, SseParser};

/// Bytes of one input that are played; the rest is ignored, so a single
/// run stays fast however large the fuzzer makes its input.
pub const INPUT_BYTES_MAX: usize = 256 * 1024;

/// The shard's read size (`READ_CHUNK_BYTES` in `shard`).
const SHARD_READ_BYTES: usize = 16 * 1024;

/// Statuses the request path may refuse with.
const REFUSAL_STATUSES: [u16; 7] = [400, 401, 404, 405, 413, 417, 431];

/// How a played connection ended (for corpus tests that want to see it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Requests answered (publishes, metrics, healthz) before the end.
    pub answered: usize,
    /// Frames encoded from publishes.
    pub frames: usize,
    /// The connection became an event stream.
    pub streamed: bool,
    /// The refusal that ended it, if any.
    pub refused: Option<u16>,
    /// Input ran out in the middle of a request.
    pub incomplete: bool,
}

/// The limits chosen by `selector`.
pub fn limits_for(selector: u8) -> Limits {
    Limits {
        head_bytes_max: [64, 512, 8192, 65536][usize::from(selector & 3)],
        body_bytes_max: [0, 16, 1024, 65536][usize::from((selector >> 2) & 3)],
        topics_max: 1 + usize::from((selector >> 4) & 7),
        authorization: (selector & 0x80 != 0).then(|| "Bearer t".to_owned()),
    }
}

/// Plays `data` through the request path; panics if an invariant breaks.
pub fn request_path(data: &[u8]) -> Outcome {
    let [selector, read_size, stream @ ..] = data else {
        return Outcome::default();
    };
    let stream = &stream[..stream.len().min(INPUT_BYTES_MAX)];
    let limits = limits_for(*selector);
    let outcome = play(stream, &limits, usize::from(*read_size).max(1));
    // Where the network splits the stream must not change the answer: the
    // same bytes read as the shard reads a socket give the same outcome.
    let whole = play(stream, &limits, SHARD_READ_BYTES);
    assert_eq!(
        outcome, whole,
        "the outcome depends on how the input was split into reads"
    );
    outcome
}

/// Where the connection is.
enum Phase {
    Head,
    Body {
        reader: BodyReader,
        topics: Vec<Topic>,
        event_type: Option<String>,
        body: Vec<u8>,
    },
}

/// Plays one connection's `stream`, delivered `read_size` bytes per `recv`.
pub fn play(stream: &[u8], limits: &Limits, read_size: usize) -> Outcome {
    let mut outcome = Outcome::default();
    let mut buf: Vec<u8> = Vec::new();
    let mut read_at = 0;
    let mut phase = Phase::Head;
    let mut next_id = 1u64;
    loop {
        // Handle everything complete in the buffer.
        let need_more = match &mut phase {
            Phase::Head => {
                if buf.is_empty() {
                    true
                } else {
                    match parse_head(&buf, limits) {
                        Ok(None) => {
                            assert!(
                                buf.len() < limits.head_bytes_max,
                                "an incomplete head of {} bytes is over the {}-byte limit",
                                buf.len(),
                                limits.head_bytes_max
                            );
                            true
                        }
                        Err(rejection) => {
                            check_rejection(&rejection);
                            outcome.refused = Some(rejection.status);
                            return outcome;
                        }
                        Ok(Some(request)) => {
                            assert!(request.head_len <= buf.len(), "head longer than the input");
                            assert!(
                                request.head_len <= limits.head_bytes_max,
                                "head of {} bytes accepted over the {}-byte limit",
                                request.head_len,
                                limits.head_bytes_max
                            );
                            buf.drain(..request.head_len);
                            match request.route {
                                Route::Events {
                                    topics,
                                    last_event_id,
                                } => {
                                    check_topics(&topics, limits);
                                    if let Some(id) = &last_event_id {
                                        assert!(id.len() <= LAST_EVENT_ID_BYTES_MAX);
                                    }
                                    // A stream discards further input.
                                    outcome.streamed = true;
                                    return outcome;
                                }
                                Route::Publish { topics, event_type } => {
                                    check_topics(&topics, limits);
                                    if let Some(event_type) = &event_type {
                                        assert!(
                                            !event_type.is_empty()
                                                && event_type.len() <= EVENT_TYPE_BYTES_MAX
                                                && !event_type.contains(['\r', '\n', '\0']),
                                            "event type {event_type:?} passed validation"
                                        );
                                    }
                                    let reader = match request.body {
                                        BodyKind::Length(length) => {
                                            assert!(length <= limits.body_bytes_max);
                                            BodyReader::Length { remaining: length }
                                        }
                                        BodyKind::Chunked => {
                                            BodyReader::Chunked(ChunkedDecoder::default())
                                        }
                                    };
                                    phase = Phase::Body {
                                        reader,
                                        topics,
                                        event_type,
                                        body: Vec::new(),
                                    };
                                    false
                                }
                                Route::Metrics | Route::Healthz => {
                                    outcome.answered += 1;
                                    if !request.keep_alive {
                                        return outcome;
                                    }
                                    false
                                }
                            }
                        }
                    }
                }
            }
            Phase::Body {
                reader,
                topics,
                event_type,
                body,
            } => match reader.feed(&buf, body, limits.body_bytes_max) {
                Err(rejection) => {
                    check_rejection(&rejection);
                    assert!(body.len() <= limits.body_bytes_max);
                    outcome.refused = Some(rejection.status);
                    return outcome;
                }
                Ok((used, done)) => {
                    assert!(used <= buf.len(), "consumed more than was given");
                    assert!(
                        body.len() <= limits.body_bytes_max,
                        "body of {} bytes over the {}-byte limit",
                        body.len(),
                        limits.body_bytes_max
                    );
                    buf.drain(..used);
                    if done {
                        let Ok(text) = std::str::from_utf8(body) else {
                            // The shard answers 400 and closes.
                            outcome.refused = Some(400);
                            return outcome;
                        };
                        let topics = std::mem::take(topics).into_boxed_slice();
                        check_frame(next_id, event_type.as_deref(), text, topics);
                        next_id += 1;
                        outcome.frames += 1;
                        outcome.answered += 1;
                        phase = Phase::Head;
                        false
                    } else {
                        true
                    }
                }
            },
        };
        if !need_more {
            continue;
        }
        if read_at >= stream.len() {
            outcome.incomplete = !buf.is_empty() || matches!(phase, Phase::Body { .. });
            return outcome;
        }
        // Head bytes beyond the limit are never read: the parse answers 431 first.
        let room = match phase {
            Phase::Head => (limits.head_bytes_max + 1).saturating_sub(buf.len()),
            Phase::Body { .. } => read_size,
        };
        let take = room.min(read_size).min(stream.len() - read_at);
        assert!(
            take > 0,
            "the head buffer is full but the parse asked for more"
        );
        buf.extend_from_slice(&stream[read_at..read_at + take]);
        read_at += take;
    }
}

fn check_rejection(rejection: &Rejection) {
    assert!(
        REFUSAL_STATUSES.contains(&rejection.status),
        "unexpected status {}",
        rejection.status
    );
    assert!(!rejection.message.is_empty() && !rejection.message.contains(['\r', '\n']));
    assert_eq!(rejection.allow.is_some(), rejection.status == 405);
}

fn check_topics(topics: &[Topic], limits: &Limits) {
    assert!(
        !topics.is_empty() && topics.len() <= limits.topics_max,
        "{} topics passed a limit of {}",
        topics.len(),
        limits.topics_max
    );
    for (index, topic) in topics.iter().enumerate() {
        assert!(
            !topic.is_empty() && topic.len() <= TOPIC_BYTES_MAX,
            "topic of {} bytes passed validation",
            topic.len()
        );
        assert!(
            !topic.contains(['\r', '\n', '\0']),
            "topic {topic:?} passed validation"
        );
        assert!(
            !topics[..index].contains(topic),
            "duplicate topic {topic:?} kept"
        );
    }
}

/// Encodes an event and checks that it parses back to exactly that event.
pub fn check_frame(id: u64, event_type: Option<&str>, data: &str, topics: Box<[Topic]>) {
    let frame = Frame::event(id, id, topics, event_type, data);
    let bytes = &frame.bytes[..];
    // Structure: field lines only, ended by LF, then one blank line at the end.
    assert!(
        bytes.ends_with(b"\n\n"),
        "frame does not end with a blank line"
    );
    let body = &bytes[..bytes.len() - 1];
    let mut lines = body[..body.len() - 1].split(|&b| b == b'\n');
    assert_eq!(
        lines.next(),
        Some(format!("id: {id}").as_bytes()),
        "first line"
    );
    let mut saw_event = false;
    let mut data_lines = 0;
    for line in lines {
        assert!(
            !line.contains(&b'\r'),
            "a CR inside a frame line ends the line for a client: {line:?}"
        );
        if line.starts_with(b"event: ") && data_lines == 0 && !saw_event {
            saw_event = true;
        } else if line.starts_with(b"data: ") {
            data_lines += 1;
        } else {
            panic!(
                "injected line {:?} in frame {:?}",
                String::from_utf8_lossy(line),
                String::from_utf8_lossy(bytes)
            );
        }
    }
    assert_eq!(saw_event, event_type.is_some(), "event line");
    // Meaning: an independent parser sees exactly the published event.
    let mut parser = SseParser::new(u32::MAX as usize);
    let mut collector = EventCollector::default();
    parser
        .feed(bytes, &mut collector)
        .expect("frame lines are within any limit");
    assert_eq!(collector.events.len(), 1, "one frame, one event");
    let event = &collector.events[0];
    assert_eq!(event.last_event_id, id.to_string());
    assert_eq!(event.event_type, event_type.unwrap_or("message"));
    assert_eq!(
        event.data,
        data.replace("\r\n", "\n").replace('\r', "\n"),
        "data must come back with line ends normalised"
    );
    assert!(collector.retry_ms.is_none() && collector.comments.is_empty());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipelined_publish_and_subscribe_play_through() {
        let mut input = vec![0b0011_1110, 7];
        input.extend_from_slice(
            b"POST /publish?topic=a&event=x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\na\r\n\r\n2\r\nb\n\r\n0\r\n\r\n\
              GET /healthz HTTP/1.1\r\n\r\n\
              GET /events?topic=a&topic=a HTTP/1.1\r\nLast-Event-ID: 5\r\n\r\nignored",
        );
        let outcome = request_path(&input);
        assert_eq!(
            outcome,
            Outcome {
                answered: 2,
                frames: 1,
                streamed: true,
                refused: None,
                incomplete: false
            }
        );
    }

    #[test]
    fn refusals_and_truncation_are_reported() {
        let mut input = vec![2, 200];
        input.extend_from_slice(b"GET /events?topic=a%0A HTTP/1.1\r\n\r\n");
        assert_eq!(request_path(&input).refused, Some(400));
        let mut input = vec![14, 3];
        input.extend_from_slice(b"POST /publish?topic=a HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc");
        assert!(request_path(&input).incomplete);
    }
}
