//! Property tests of the request path (run in every `cargo test`):
//!
//! - arbitrary bytes into `parse_head`, the chunked decoder and the whole
//!   request path never panic, and whatever is accepted respects the limits;
//! - a valid request parses to what was sent (topics percent-decoded and
//!   de-duplicated, event type, `Last-Event-ID` with the header winning), is
//!   "incomplete" at every shorter prefix (so a head split at any point across
//!   reads parses the same), and ignores what follows it (pipelining);
//! - chunked bodies (random chunking, extensions, trailers, hex case) decode
//!   to the data at any split of the input, leave the next request's bytes
//!   alone, and never grow past the body limit;
//! - `Frame::event` output, read by the harness's WHATWG parser, is exactly one
//!   event with the same id, type and data (CR, LF and CRLF normalised to LF),
//!   and never carries an injected field, whatever the data holds.
//!
//! Failures print the minimal input and proptest's seed
//! (`PROPTEST_CASES` / `PROPTEST_MAX_SHRINK_ITERS` tune it).

mod common;

use std::collections::VecDeque;

use plenum::http::{parse_head, BodyKind, BodyReader, ChunkedDecoder, Limits, Route};
use plenum::hub::{Frame, Topic};
use proptest::prelude::*;

use common::{SseItem, SseParser};

fn limits(head_bytes_max: usize, body_bytes_max: usize, topics_max: usize) -> Limits {
    Limits {
        head_bytes_max,
        body_bytes_max,
        topics_max,
        authorization: None,
    }
}

/// Bytes that look like HTTP often enough to get past the request line.
fn http_ish_bytes() -> impl Strategy<Value = Vec<u8>> {
    let pieces = prop_oneof![
        Just(b"GET ".to_vec()),
        Just(b"POST ".to_vec()),
        Just(b"/events?".to_vec()),
        Just(b"/publish?".to_vec()),
        Just(b"topic=".to_vec()),
        Just(b"&event=".to_vec()),
        Just(b"&lastEventID=".to_vec()),
        Just(b"%0A".to_vec()),
        Just(b"%FF".to_vec()),
        Just(b" HTTP/1.1\r\n".to_vec()),
        Just(b"Content-Length: 3\r\n".to_vec()),
        Just(b"Transfer-Encoding: chunked\r\n".to_vec()),
        Just(b"Last-Event-ID: 7\r\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    proptest::collection::vec(pieces, 0..24).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_accepted_heads_respect_the_limits(
        bytes in prop_oneof![proptest::collection::vec(any::<u8>(), 0..1024), http_ish_bytes()],
        head_bytes_max in 16usize..2048,
        topics_max in 1usize..8,
    ) {
        let limits = limits(head_bytes_max, 1024, topics_max);
        match parse_head(&bytes, &limits) {
            Ok(None) => prop_assert!(bytes.len() < head_bytes_max, "incomplete head over the limit"),
            Err(rejection) => prop_assert!([400, 401, 404, 405, 413, 417, 431].contains(&rejection.status)),
            Ok(Some(request)) => {
                prop_assert!(request.head_len <= bytes.len() && request.head_len <= head_bytes_max);
                let topics = match &request.route {
                    Route::Events { topics, last_event_id } => {
                        prop_assert!(last_event_id.as_ref().is_none_or(|id| id.len() <= 256));
                        topics.clone()
                    }
                    Route::Publish { topics, event_type } => {
                        prop_assert!(event_type.as_ref().is_none_or(|t| !t.is_empty() && !t.contains(['\r', '\n', '\0'])));
                        topics.clone()
                    }
                    Route::Metrics | Route::Healthz => vec![Topic::from("-")],
                };
                prop_assert!(!topics.is_empty() && topics.len() <= topics_max);
                for topic in &topics {
                    prop_assert!(!topic.is_empty() && !topic.contains(['\r', '\n', '\0']));
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_through_the_whole_request_path_never_panic(
        bytes in prop_oneof![proptest::collection::vec(any::<u8>(), 0..1024), http_ish_bytes()],
        selector in any::<u8>(),
        read_size in 1u8..=255,
    ) {
        let mut input = vec![selector, read_size];
        input.extend_from_slice(&bytes);
        // Asserts its own invariants (see `plenum::http::fuzz`).
        plenum::http::fuzz::request_path(&input);
    }

    #[test]
    fn arbitrary_bytes_into_the_chunked_decoder_stay_within_the_limit(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            proptest::collection::vec(prop_oneof![Just(b'0'), Just(b'a'), Just(b'F'), Just(b';'), Just(b'\r'), Just(b'\n'), Just(b'x')], 0..512),
        ],
        max in 0usize..64,
    ) {
        let mut body = Vec::new();
        if let Ok((used, _done)) = ChunkedDecoder::default().feed(&bytes, &mut body, max) {
            prop_assert!(used <= bytes.len());
        }
        prop_assert!(body.len() <= max);
    }
}

// ---------------------------------------------------------------------------
// Valid requests
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct ValidRequest {
    publish: bool,
    topics: Vec<String>,
    event_type: Option<String>,
    header_id: Option<String>,
    query_id: Option<String>,
    extra_headers: Vec<(String, String)>,
    body: Vec<u8>,
    chunked: bool,
}

impl ValidRequest {
    fn bytes(&self) -> Vec<u8> {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for topic in &self.topics {
            query.append_pair("topic", topic);
        }
        if let Some(event_type) = &self.event_type {
            query.append_pair("event", event_type);
        }
        if let Some(id) = &self.query_id {
            query.append_pair("lastEventID", id);
        }
        let path = if self.publish { "/publish" } else { "/events" };
        let method = if self.publish { "POST" } else { "GET" };
        let mut head = format!(
            "{method} {path}?{} HTTP/1.1\r\nHost: plenum.test\r\n",
            query.finish()
        );
        for (name, value) in &self.extra_headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(id) = &self.header_id {
            head.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        if self.publish {
            if self.chunked {
                head.push_str("Transfer-Encoding: chunked\r\n");
            } else {
                head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
            }
        }
        head.push_str("\r\n");
        head.into_bytes()
    }

    fn expected_route(&self) -> Route {
        let mut topics: Vec<Topic> = Vec::new();
        for topic in &self.topics {
            if !topics.iter().any(|t| **t == **topic) {
                topics.push(Topic::from(topic.as_str()));
            }
        }
        if self.publish {
            Route::Publish {
                topics,
                event_type: self.event_type.clone(),
            }
        } else {
            Route::Events {
                topics,
                last_event_id: self.header_id.clone().or_else(|| self.query_id.clone()),
            }
        }
    }
}

/// Topic and event-type text: reserved URL characters, spaces, `+`, `%`, and
/// non-ASCII, but no CR, LF or NUL.
fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 /_.~!*'()%&=+;:,?#\\[\\]@$\u{e9}\u{4e2d}\u{1f600}-]{1,24}"
}

fn valid_request() -> impl Strategy<Value = ValidRequest> {
    (
        any::<bool>(),
        proptest::collection::vec(prop_oneof![name(), Just("dup".to_string())], 1..6),
        proptest::option::of(name()),
        proptest::option::of("[0-9]{1,20}|[ -~]{0,40}"),
        proptest::option::of("[0-9]{1,20}"),
        proptest::collection::vec(("X-[A-Za-z0-9-]{1,12}", "[ -~]{0,40}"), 0..6),
        proptest::collection::vec(any::<u8>(), 0..64),
        any::<bool>(),
    )
        .prop_map(
            |(publish, topics, event_type, header_id, query_id, extra_headers, body, chunked)| {
                ValidRequest {
                    publish,
                    topics,
                    event_type: if publish { event_type } else { None },
                    header_id: if publish {
                        None
                    } else {
                        header_id.map(|id| id.trim().to_string())
                    },
                    query_id: if publish { None } else { query_id },
                    // Header values are trimmed by the parser; keep them trim-stable.
                    extra_headers: extra_headers
                        .into_iter()
                        .map(|(n, v)| (n, v.trim().to_string()))
                        .collect(),
                    body,
                    chunked,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_valid_request_parses_the_same_whatever_the_split_and_whatever_follows(
        request in valid_request(),
        next in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let limits = limits(8192, 1 << 20, 8);
        let head = request.bytes();
        let parsed = parse_head(&head, &limits)
            .unwrap_or_else(|rejection| panic!("{request:?} refused: {rejection:?}"))
            .unwrap_or_else(|| panic!("{request:?} incomplete"));
        prop_assert_eq!(parsed.head_len, head.len());
        prop_assert_eq!(&parsed.route, &request.expected_route());
        if request.publish {
            let kind = if request.chunked { BodyKind::Chunked } else { BodyKind::Length(request.body.len()) };
            prop_assert_eq!(parsed.body, kind);
        }
        // Any shorter prefix is "read more", never a refusal: a head split
        // across reads at any point parses the same once complete.
        for split in 0..head.len() {
            prop_assert_eq!(parse_head(&head[..split], &limits), Ok(None), "prefix of {} bytes", split);
        }
        // Pipelining: what follows the head does not change it.
        let mut pipelined = head.clone();
        pipelined.extend_from_slice(&next);
        prop_assert_eq!(parse_head(&pipelined, &limits), Ok(Some(parsed)));
    }
}

// ---------------------------------------------------------------------------
// Chunked bodies
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Chunked {
    data: Vec<u8>,
    /// Where the data is cut into chunks.
    cuts: Vec<usize>,
    extensions: Vec<String>,
    trailers: Vec<(String, String)>,
    upper_case: bool,
    leading_zeros: usize,
}

impl Chunked {
    fn encode(&self) -> Vec<u8> {
        let mut cuts: Vec<usize> = self
            .cuts
            .iter()
            .map(|c| c % (self.data.len() + 1))
            .collect();
        cuts.push(0);
        cuts.push(self.data.len());
        cuts.sort();
        cuts.dedup();
        let mut out = Vec::new();
        for (index, pair) in cuts.windows(2).enumerate() {
            let chunk = &self.data[pair[0]..pair[1]];
            let size = if self.upper_case {
                format!("{:X}", chunk.len())
            } else {
                format!("{:x}", chunk.len())
            };
            let zeros = self.leading_zeros.min(15 - size.len());
            out.extend_from_slice("0".repeat(zeros).as_bytes());
            out.extend_from_slice(size.as_bytes());
            if let Some(extension) = self.extensions.get(index) {
                out.extend_from_slice(format!(";{extension}").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        for (name, value) in &self.trailers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

fn chunked() -> impl Strategy<Value = Chunked> {
    (
        proptest::collection::vec(any::<u8>(), 1..600),
        proptest::collection::vec(any::<usize>(), 0..12),
        proptest::collection::vec("[a-z]{1,8}(=[a-z0-9\"]{0,10})?", 0..12),
        proptest::collection::vec(("[A-Za-z-]{1,10}", "[ -~]{0,30}"), 0..4),
        any::<bool>(),
        0usize..6,
    )
        .prop_map(
            |(data, cuts, extensions, trailers, upper_case, leading_zeros)| Chunked {
                data,
                cuts,
                extensions,
                trailers,
                upper_case,
                leading_zeros,
            },
        )
}

/// Feeds `input` to `reader` in pieces cut at `splits`, keeping unconsumed
/// bytes as the shard does. Returns (body, consumed, done) or the refusal.
fn feed_split(
    mut reader: BodyReader,
    input: &[u8],
    splits: &[usize],
    max: usize,
) -> Result<(Vec<u8>, usize, bool), u16> {
    let mut cuts: Vec<usize> = splits.iter().map(|s| s % (input.len() + 1)).collect();
    cuts.push(input.len());
    cuts.sort();
    let mut body = Vec::new();
    let mut buffered: Vec<u8> = Vec::new();
    let mut delivered = 0;
    let mut consumed = 0;
    for cut in cuts {
        buffered.extend_from_slice(&input[delivered..cut]);
        delivered = cut;
        let (used, done) = reader
            .feed(&buffered, &mut body, max)
            .map_err(|r| r.status)?;
        assert!(body.len() <= max, "body over the limit");
        buffered.drain(..used);
        consumed += used;
        if done {
            return Ok((body, consumed, true));
        }
    }
    Ok((body, consumed, false))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn chunked_bodies_round_trip_at_any_split(
        body in chunked(),
        splits in proptest::collection::vec(any::<usize>(), 0..8),
        next in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let encoded = body.encode();
        let mut input = encoded.clone();
        input.extend_from_slice(&next);
        let max = body.data.len();
        let result = feed_split(BodyReader::Chunked(ChunkedDecoder::default()), &input, &splits, max);
        prop_assert_eq!(result, Ok((body.data.clone(), encoded.len(), true)), "encoded {:?}", String::from_utf8_lossy(&encoded));
        // One byte under the data's size is refused as too large, never truncated.
        let result = feed_split(BodyReader::Chunked(ChunkedDecoder::default()), &input, &splits, max - 1);
        prop_assert_eq!(result, Err(413));
    }

    #[test]
    fn content_length_bodies_round_trip_at_any_split(
        data in proptest::collection::vec(any::<u8>(), 0..600),
        splits in proptest::collection::vec(any::<usize>(), 0..8),
        next in proptest::collection::vec(any::<u8>(), 0..32),
    ) {
        let mut input = data.clone();
        input.extend_from_slice(&next);
        let reader = BodyReader::Length { remaining: data.len() };
        let (body, consumed, done) = feed_split(reader, &input, &splits, data.len()).unwrap();
        prop_assert_eq!(body, data.clone());
        prop_assert_eq!(consumed, data.len());
        prop_assert!(done || data.is_empty());
    }
}

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

/// Data biased towards line ends and field-like text.
fn event_data() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        proptest::collection::vec(
            prop_oneof![
                Just("\r".to_string()),
                Just("\n".to_string()),
                Just("\r\n".to_string()),
                Just("\0".to_string()),
                Just("id: 1".to_string()),
                Just("event: evil".to_string()),
                Just("data: x".to_string()),
                Just("retry: 5".to_string()),
                Just(":".to_string()),
                Just(" ".to_string()),
                Just("\u{feff}".to_string()),
                "[a-z\u{e9}]{1,5}",
            ],
            0..24,
        )
        .prop_map(|parts| parts.concat()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn frames_parse_back_to_the_same_event_and_never_carry_an_injected_field(
        id in any::<u64>(),
        event_type in proptest::option::of("[^\r\n\0]{1,20}"),
        data in event_data(),
        split in any::<usize>(),
    ) {
        let frame = Frame::event(id, 1, Box::new([]), event_type.as_deref(), &data);
        let bytes = &frame.bytes[..];
        // Read as a client does, split at an arbitrary point.
        let split = split % (bytes.len() + 1);
        let mut parser = SseParser::default();
        let mut items = VecDeque::new();
        parser.feed(&bytes[..split], &mut items);
        parser.feed(&bytes[split..], &mut items);
        prop_assert!(parser.unknown_lines.is_empty(), "injected lines: {:?}", parser.unknown_lines);
        prop_assert_eq!(items.len(), 1, "one frame must be one event: {:?}", items);
        let SseItem::Event(event) = items.pop_front().unwrap() else {
            panic!("not an event");
        };
        prop_assert_eq!(&event.id, &Some(id.to_string()));
        prop_assert_eq!(&event.event, &event_type);
        prop_assert_eq!(event.data(), data.replace("\r\n", "\n").replace('\r', "\n"));
        // The encoder's own line split agrees with the client's.
        prop_assert_eq!(plenum::hub::lines(&data).count(), event.data_lines.len());
    }
}
