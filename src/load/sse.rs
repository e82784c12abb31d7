//! Incremental `text/event-stream` parser (WHATWG HTML, "Server-sent events",
//! section 9.2.6 "Interpreting an event stream").
//!
//! The parser is a pure state machine: bytes go in through [`SseParser::feed`] in
//! whatever pieces the network delivers, and field-level callbacks come out
//! through a [`SseSink`]. It does no I/O and never looks at a clock.
//!
//! How it works:
//! 1. A leading byte-order mark (`EF BB BF`) is dropped once, even when it is split
//!    across reads.
//! 2. Lines end with CRLF, LF or CR. A CR that is the last byte of one read and an
//!    LF that is the first byte of the next are one line end (`skip_lf`).
//! 3. A complete line is handled straight from the caller's buffer; only the bytes
//!    of a line that is not yet complete are copied into a small carry-over
//!    (`carry`), bounded by `line_bytes_max`.
//! 4. Each line is a blank line (dispatch), a comment (`:` first), a field with a
//!    value (`name:value`, one space after the colon stripped) or a field with no
//!    colon (the whole line is the name, the value is empty).
//!
//! Why callbacks rather than an event struct: a load generator holds tens of
//! thousands of streams per process, and it only needs a few numbers out of each
//! event. The sink decides what to keep, so the parser itself holds no data
//! buffer, no event type and no id: per stream it costs the carry-over plus a few
//! flags. [`EventCollector`] is a sink that builds whole events exactly as a
//! browser's `EventSource` would (used by the tests, and useful to anyone who
//! wants events).
//!
//! Bytes are not validated as UTF-8: names are compared as bytes, values are
//! handed over as bytes.

use memchr::memchr2;

/// The UTF-8 byte-order mark, dropped once at the start of a stream.
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// Default bound on one line, in bytes (a longer line is a protocol error).
pub const LINE_BYTES_MAX_DEFAULT: usize = 1 << 20;

/// Carry-over capacity kept between lines; a larger allocation is given back.
const CARRY_CAPACITY_KEPT_BYTES: usize = 1024;

/// Receives the fields of a stream, in order, as the parser finds them.
///
/// The sink is responsible for the event-level semantics the spec puts on
/// `EventSource`: the data buffer (join `data_line`s with `\n`), the event type
/// buffer (reset at each blank line), and the last event id (an `id` field
/// takes effect at the next blank line, whether or not an event is dispatched).
pub trait SseSink {
    /// A `data` field: one line of the current event's data.
    fn data_line(&mut self, value: &[u8]);
    /// An `event` field: the type of the current event (the last one wins).
    fn event_type(&mut self, value: &[u8]);
    /// An `id` field whose value contains no NUL (others are ignored, per spec).
    fn id(&mut self, value: &[u8]);
    /// A `retry` field made only of ASCII digits: the reconnection time in ms.
    fn retry(&mut self, milliseconds: u64);
    /// A comment line (the text after the leading `:`).
    fn comment(&mut self, _text: &[u8]) {}
    /// A blank line ended an event that had at least one `data` field.
    fn dispatch(&mut self);
    /// A blank line ended an event with no `data` field: nothing is dispatched,
    /// but a pending `id` still takes effect and the event type is reset.
    fn discard(&mut self);
}

/// A protocol error: the stream cannot be parsed any further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseError {
    /// A line grew past the parser's `line_bytes_max`.
    LineTooLong,
}

impl std::fmt::Display for SseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SseError::LineTooLong => f.write_str("sse line too long"),
        }
    }
}

impl std::error::Error for SseError {}

/// The incremental parser state of one stream.
#[derive(Debug)]
pub struct SseParser {
    /// Bytes of the current line not yet ended; empty between lines.
    carry: Vec<u8>,
    /// Bound on `carry` (and so on one line), in bytes.
    line_bytes_max: u32,
    /// Bytes of the byte-order mark matched so far, while `at_start`.
    bom_matched: u8,
    /// No byte of the stream has been handled yet past a possible BOM.
    at_start: bool,
    /// The previous line ended with a CR at the end of a read: an LF that
    /// starts the next read belongs to that line end.
    skip_lf: bool,
    /// The current event has at least one `data` field.
    has_data: bool,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new(LINE_BYTES_MAX_DEFAULT)
    }
}

impl SseParser {
    /// A parser for a new stream; lines longer than `line_bytes_max` are errors.
    pub fn new(line_bytes_max: usize) -> Self {
        assert!(line_bytes_max > 0 && line_bytes_max <= u32::MAX as usize);
        SseParser {
            carry: Vec::new(),
            line_bytes_max: line_bytes_max as u32,
            bom_matched: 0,
            at_start: true,
            skip_lf: false,
            has_data: false,
        }
    }

    /// Bytes held for a line not yet complete (for memory accounting).
    pub fn carry_capacity_bytes(&self) -> usize {
        self.carry.capacity()
    }

    /// Feeds the next bytes of the stream; calls `sink` for each complete line.
    pub fn feed<S: SseSink>(&mut self, mut input: &[u8], sink: &mut S) -> Result<(), SseError> {
        if self.at_start {
            // Step 1: the BOM, possibly split across reads.
            while let Some((&byte, rest)) = input.split_first() {
                if byte == BOM[self.bom_matched as usize] {
                    self.bom_matched += 1;
                    input = rest;
                    if self.bom_matched as usize == BOM.len() {
                        self.at_start = false;
                        break;
                    }
                } else {
                    // Not a BOM after all: the matched bytes are content.
                    self.at_start = false;
                    let matched = self.bom_matched as usize;
                    self.bom_matched = 0;
                    if matched > 0 {
                        self.feed_lines(&BOM[..matched], sink)?;
                    }
                    break;
                }
            }
            if self.at_start {
                return Ok(());
            }
        }
        self.feed_lines(input, sink)
    }

    /// Step 2 and 3: splits `input` into lines, carrying an unfinished one over.
    fn feed_lines<S: SseSink>(&mut self, mut input: &[u8], sink: &mut S) -> Result<(), SseError> {
        if self.skip_lf {
            if let Some((&first, rest)) = input.split_first() {
                self.skip_lf = false;
                if first == b'\n' {
                    input = rest;
                }
            }
        }
        while !input.is_empty() {
            let Some(end) = memchr2(b'\n', b'\r', input) else {
                if self.carry.len() + input.len() > self.line_bytes_max as usize {
                    return Err(SseError::LineTooLong);
                }
                self.carry.extend_from_slice(input);
                return Ok(());
            };
            if self.carry.is_empty() {
                handle_line(&input[..end], &mut self.has_data, sink);
            } else {
                if self.carry.len() + end > self.line_bytes_max as usize {
                    return Err(SseError::LineTooLong);
                }
                self.carry.extend_from_slice(&input[..end]);
                handle_line(&self.carry, &mut self.has_data, sink);
                self.carry.clear();
                if self.carry.capacity() > CARRY_CAPACITY_KEPT_BYTES {
                    self.carry = Vec::new();
                }
            }
            let mut consumed = end + 1;
            if input[end] == b'\r' {
                match input.get(end + 1) {
                    Some(b'\n') => consumed += 1,
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
            input = &input[consumed..];
        }
        Ok(())
    }
}

/// Step 4: one complete line, without its line end.
fn handle_line<S: SseSink>(line: &[u8], has_data: &mut bool, sink: &mut S) {
    if line.is_empty() {
        if std::mem::take(has_data) {
            sink.dispatch();
        } else {
            sink.discard();
        }
        return;
    }
    let (name, value) = match memchr::memchr(b':', line) {
        Some(0) => {
            sink.comment(&line[1..]);
            return;
        }
        Some(colon) => {
            let value = &line[colon + 1..];
            (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
        }
        None => (line, &b""[..]),
    };
    match name {
        b"data" => {
            *has_data = true;
            sink.data_line(value);
        }
        b"event" => sink.event_type(value),
        b"id" if memchr::memchr(0, value).is_none() => sink.id(value),
        b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
            // Saturate rather than wrap: a huge retry is "wait very long".
            let milliseconds = value.iter().fold(0u64, |acc, &digit| {
                acc.saturating_mul(10)
                    .saturating_add(u64::from(digit - b'0'))
            });
            sink.retry(milliseconds);
        }
        _ => {}
    }
}

/// One dispatched event, as a browser's `EventSource` would deliver it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event type (`message` when no `event` field was given).
    pub event_type: String,
    /// The data lines joined with `\n`.
    pub data: String,
    /// The stream's last event id at the time of dispatch.
    pub last_event_id: String,
}

/// A sink that builds whole [`Event`]s with the spec's buffer semantics.
#[derive(Debug, Default)]
pub struct EventCollector {
    /// Events dispatched so far.
    pub events: Vec<Event>,
    /// The last `retry` value seen, in ms.
    pub retry_ms: Option<u64>,
    /// Comments seen, in order.
    pub comments: Vec<String>,
    /// The last event id string (updated at each blank line).
    pub last_event_id: String,
    data: Vec<u8>,
    event_type: Vec<u8>,
    id_buffer: Option<Vec<u8>>,
}

impl EventCollector {
    fn end_of_event(&mut self) {
        if let Some(id) = self.id_buffer.take() {
            self.last_event_id = String::from_utf8_lossy(&id).into_owned();
            // The id buffer persists per spec; re-arm it with the same value.
            self.id_buffer = Some(id);
        }
        self.event_type.clear();
        self.data.clear();
    }
}

impl SseSink for EventCollector {
    fn data_line(&mut self, value: &[u8]) {
        self.data.extend_from_slice(value);
        self.data.push(b'\n');
    }
    fn event_type(&mut self, value: &[u8]) {
        self.event_type.clear();
        self.event_type.extend_from_slice(value);
    }
    fn id(&mut self, value: &[u8]) {
        self.id_buffer = Some(value.to_vec());
    }
    fn retry(&mut self, milliseconds: u64) {
        self.retry_ms = Some(milliseconds);
    }
    fn comment(&mut self, text: &[u8]) {
        self.comments
            .push(String::from_utf8_lossy(text).into_owned());
    }
    fn dispatch(&mut self) {
        let mut data = std::mem::take(&mut self.data);
        debug_assert_eq!(data.last(), Some(&b'\n'));
        data.pop();
        let event_type = if self.event_type.is_empty() {
            "message".to_owned()
        } else {
            String::from_utf8_lossy(&self.event_type).into_owned()
        };
        self.end_of_event();
        self.events.push(Event {
            event_type,
            data: String::from_utf8_lossy(&data).into_owned(),
            last_event_id: self.last_event_id.clone(),
        });
    }
    fn discard(&mut self) {
        self.end_of_event();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(event_type: &str, data: &str, id: &str) -> Event {
        Event {
            event_type: event_type.to_owned(),
            data: data.to_owned(),
            last_event_id: id.to_owned(),
        }
    }

    /// What a whole stream parses to: events, last retry, comments, final id.
    type Outcome = (Vec<Event>, Option<u64>, Vec<String>, String);

    fn parse_pieces(pieces: &[&[u8]]) -> Outcome {
        let mut parser = SseParser::default();
        let mut sink = EventCollector::default();
        for piece in pieces {
            parser.feed(piece, &mut sink).unwrap();
        }
        (
            sink.events,
            sink.retry_ms,
            sink.comments,
            sink.last_event_id,
        )
    }

    /// A tricky stream: (name, bytes, expected events, expected retry).
    type Case = (&'static str, &'static [u8], Vec<Event>, Option<u64>);

    /// The tricky streams.
    fn table() -> Vec<Case> {
        vec![
            ("lf", b"data: a\n\n", vec![event("message", "a", "")], None),
            ("crlf", b"data: a\r\n\r\n", vec![event("message", "a", "")], None),
            ("cr only", b"data: a\r\rdata: b\r\r", vec![event("message", "a", ""), event("message", "b", "")], None),
            ("mixed line ends", b"data: a\r\ndata: b\rdata: c\n\r\n", vec![event("message", "a\nb\nc", "")], None),
            ("multi-line data", b"data: one\ndata: two\ndata: three\n\n", vec![event("message", "one\ntwo\nthree", "")], None),
            ("bom", b"\xEF\xBB\xBFdata: a\n\n", vec![event("message", "a", "")], None),
            ("only first bom dropped", b"\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\ndata: b\n\n", vec![event("message", "b", "")], None),
            ("comments", b": hello\n:\ndata: a\n: mid\n\n", vec![event("message", "a", "")], None),
            ("no colon field", b"data\n\ndata\ndata\n\n", vec![event("message", "", ""), event("message", "\n", "")], None),
            ("one space stripped", b"data:  two spaces\ndata:none\n\n", vec![event("message", " two spaces\nnone", "")], None),
            ("event type and reset", b"event: tick\ndata: 1\n\ndata: 2\n\n", vec![event("tick", "1", ""), event("message", "2", "")], None),
            ("last event type wins", b"event: a\nevent: b\ndata: x\n\n", vec![event("b", "x", "")], None),
            ("id persists", b"id: 7\ndata: a\n\ndata: b\n\n", vec![event("message", "a", "7"), event("message", "b", "7")], None),
            ("empty id resets", b"id: 7\ndata: a\n\nid\ndata: b\n\n", vec![event("message", "a", "7"), event("message", "b", "")], None),
            ("id with nul ignored", b"id: 7\ndata: a\n\nid: 8\x009\ndata: b\n\n", vec![event("message", "a", "7"), event("message", "b", "7")], None),
            ("id-only block updates id", b"id: 5\n\ndata: a\n\n", vec![event("message", "a", "5")], None),
            ("event without data is not dispatched", b"event: x\n\ndata: a\n\n", vec![event("message", "a", "")], None),
            ("retry", b"retry: 1500\ndata: a\n\n", vec![event("message", "a", "")], Some(1500)),
            ("retry not digits ignored", b"retry: 15x\nretry: -1\nretry:\n\n", vec![], None),
            ("unknown field ignored", b"foo: bar\ndata: a\n\n", vec![event("message", "a", "")], None),
            ("incomplete event discarded", b"data: a\n\ndata: b\n", vec![event("message", "a", "")], None),
            ("plenum gap", b":ok\n\nevent: plenum-gap\ndata: {\"reason\":\"too_old\"}\n\nid: 9\ndata: seq=3 ts=1\n\n", vec![event("plenum-gap", "{\"reason\":\"too_old\"}", ""), event("message", "seq=3 ts=1", "9")], None),
            ("colon in value", b"data: a:b: c\n\n", vec![event("message", "a:b: c", "")], None),
            ("blank lines only", b"\n\n\r\n\r\r", vec![], None),
            ("field name case matters", b"Data: a\ndata: b\n\n", vec![event("message", "b", "")], None),
        ]
    }

    #[test]
    fn table_whole() {
        for (name, stream, events, retry) in table() {
            let (got, got_retry, _, _) = parse_pieces(&[stream]);
            assert_eq!(got, events, "stream {name:?}");
            assert_eq!(got_retry, retry, "stream {name:?}");
        }
    }

    #[test]
    fn table_split_at_every_position() {
        for (name, stream, _, _) in table() {
            let whole = parse_pieces(&[stream]);
            for split in 0..=stream.len() {
                let (a, b) = stream.split_at(split);
                assert_eq!(
                    parse_pieces(&[a, b]),
                    whole,
                    "stream {name:?} split at {split}"
                );
            }
        }
    }

    #[test]
    fn table_split_at_every_pair_of_positions() {
        for (name, stream, _, _) in table() {
            let whole = parse_pieces(&[stream]);
            for first in 0..=stream.len() {
                for second in first..=stream.len() {
                    let pieces = [&stream[..first], &stream[first..second], &stream[second..]];
                    assert_eq!(
                        parse_pieces(&pieces),
                        whole,
                        "stream {name:?} split at {first},{second}"
                    );
                }
            }
        }
    }

    #[test]
    fn table_byte_by_byte() {
        for (name, stream, _, _) in table() {
            let whole = parse_pieces(&[stream]);
            let pieces: Vec<&[u8]> = stream.chunks(1).collect();
            assert_eq!(parse_pieces(&pieces), whole, "stream {name:?}");
        }
    }

    proptest::proptest! {
        /// Any stream built from the tricky pieces parses the same however
        /// it is split into reads.
        #[test]
        fn random_streams_parse_the_same_split_anywhere(
            pieces in proptest::collection::vec(0usize..TOKENS.len(), 0..60),
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let stream: Vec<u8> = pieces.iter().flat_map(|&i| TOKENS[i].iter().copied()).collect();
            let whole = parse_pieces(&[&stream]);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|cut| cut.min(stream.len())).collect();
            cuts.sort_unstable();
            let mut reads: Vec<&[u8]> = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain([stream.len()]) {
                reads.push(&stream[start..cut]);
                start = cut;
            }
            proptest::prop_assert_eq!(parse_pieces(&reads), whole);
        }
    }

    /// The alphabet of the random streams.
    const TOKENS: &[&[u8]] = &[
        b"data",
        b"event",
        b"id",
        b"retry",
        b":",
        b" ",
        b"\r",
        b"\n",
        b"\r\n",
        b"x",
        b"12",
        b"\xEF\xBB\xBF",
        b"\0",
        b"plenum-gap",
    ];

    #[test]
    fn cr_at_end_of_read_then_lf_is_one_line_end() {
        // Two reads "data: a\r" + "\ndata: b\n\n" must be one event "a\nb",
        // not "a" then an empty line dispatch.
        let (events, ..) = parse_pieces(&[b"data: a\r", b"\ndata: b\n\n"]);
        assert_eq!(events, vec![event("message", "a\nb", "")]);
        // And an empty read in between does not forget the CR.
        let (events, ..) = parse_pieces(&[b"data: a\r", b"", b"\ndata: b\n\n"]);
        assert_eq!(events, vec![event("message", "a\nb", "")]);
    }

    #[test]
    fn partial_bom_is_content() {
        // EF BB followed by something else: not a BOM, the bytes are content.
        let (events, ..) = parse_pieces(&[b"\xEF", b"\xBBx\n\ndata: a\n\n"]);
        assert_eq!(events, vec![event("message", "a", "")]);
        let (events, ..) = parse_pieces(&[b"\xEF\xBB", b"data: a\n\n"]);
        assert_eq!(
            events,
            Vec::<Event>::new(),
            "the line is \\xEF\\xBBdata, an unknown field"
        );
    }

    #[test]
    fn comments_are_reported() {
        let (_, _, comments, _) = parse_pieces(&[b":ok\n\n: hi\n"]);
        assert_eq!(comments, vec!["ok".to_owned(), " hi".to_owned()]);
    }

    #[test]
    fn line_too_long_is_an_error() {
        let mut parser = SseParser::new(8);
        let mut sink = EventCollector::default();
        assert_eq!(parser.feed(b"data: 12", &mut sink), Ok(()));
        assert_eq!(parser.feed(b"3", &mut sink), Err(SseError::LineTooLong));
        let mut parser = SseParser::new(8);
        assert_eq!(parser.feed(b"data: ", &mut sink), Ok(()));
        assert_eq!(parser.feed(b"123\n", &mut sink), Err(SseError::LineTooLong));
    }

    #[test]
    fn carry_is_given_back_after_a_long_line() {
        let mut parser = SseParser::default();
        let mut sink = EventCollector::default();
        let long = vec![b'x'; 10_000];
        parser.feed(b"data: ", &mut sink).unwrap();
        parser.feed(&long, &mut sink).unwrap();
        assert!(parser.carry_capacity_bytes() >= 10_000);
        parser.feed(b"\n\n", &mut sink).unwrap();
        assert_eq!(parser.carry_capacity_bytes(), 0);
        assert_eq!(sink.events[0].data.len(), 10_000);
    }
}
