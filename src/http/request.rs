//! Request heads: parse with `httparse`, route, validate.
//!
//! Validation happens here, before anything reaches the hub, so that a bad
//! request affects nobody else: topics and event types may not contain CR,
//! LF or NUL (they would inject lines into every subscriber's stream), a
//! request may not carry both `Content-Length` and `Transfer-Encoding`
//! (request smuggling), and every size is bounded.

use crate::config::REQUEST_HEADERS_MAX;
use crate::hub::Topic;

/// The longest topic name, in bytes.
pub const TOPIC_BYTES_MAX: usize = 1024;
/// The longest event type, in bytes.
pub const EVENT_TYPE_BYTES_MAX: usize = 256;
/// Topics collected from one query before the configured limit is applied,
/// so that a flood of `topic=` parameters is never stored.
const TOPICS_COLLECTED_MAX: usize = 4096;
/// The longest `Last-Event-ID`, in bytes.
pub const LAST_EVENT_ID_BYTES_MAX: usize = 256;

/// Bounds a request is checked against.
#[derive(Debug, Clone)]
pub struct Limits {
    pub head_bytes_max: usize,
    pub body_bytes_max: usize,
    pub topics_max: usize,
    /// The full expected `Authorization` header value, `Bearer <token>`.
    pub authorization: Option<String>,
}

/// A request refused with a status and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: u16,
    pub message: &'static str,
    /// The `Allow` header for 405.
    pub allow: Option<&'static str>,
}

impl Rejection {
    pub const fn new(status: u16, message: &'static str) -> Rejection {
        Rejection {
            status,
            message,
            allow: None,
        }
    }

    const fn method(allow: &'static str) -> Rejection {
        Rejection {
            status: 405,
            message: "method not allowed",
            allow: Some(allow),
        }
    }
}

/// How the request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Length(usize),
    Chunked,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Subscribe. `last_event_id`: the header, else the `lastEventID` parameter.
    Events {
        topics: Vec<Topic>,
        last_event_id: Option<String>,
    },
    Publish {
        topics: Vec<Topic>,
        event_type: Option<String>,
    },
    Metrics,
    Healthz,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub route: Route,
    /// Bytes of the head, including the blank line.
    pub head_len: usize,
    pub body: BodyKind,
    pub expect_continue: bool,
    /// The client wants the connection kept open after the response.
    pub keep_alive: bool,
}

/// Parses a request head from the start of `buf`. `Ok(None)`: incomplete,
/// read more. Sizes, headers, route and parameters are all checked here.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<Request>, Rejection> {
    // Bytes past the limit are never looked at, so a head over it is a 431
    // whether the bytes came in one read or trickled in (an error past the
    // limit would otherwise be a 400 in one case and a 431 in the other).
    let buf = &buf[..buf.len().min(limits.head_bytes_max)];
    let mut headers = [httparse::EMPTY_HEADER; REQUEST_HEADERS_MAX];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= limits.head_bytes_max {
                Err(Rejection::new(431, "request head too large"))
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Rejection::new(431, "too many headers"))
        }
        Err(_) => return Err(Rejection::new(400, "malformed request")),
    };
    if head_len > limits.head_bytes_max {
        return Err(Rejection::new(431, "request head too large"));
    }
    let method = parsed.method.expect("complete");
    let target = parsed.path.expect("complete");
    let http_1_1 = parsed.version == Some(1);

    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut expect_continue = false;
    let mut keep_alive = http_1_1;
    let mut last_event_id_header: Option<&[u8]> = None;
    let mut authorization: Option<&[u8]> = None;
    for header in parsed.headers.iter() {
        let name = header.name;
        let value = trim(header.value);
        if name.eq_ignore_ascii_case("content-length") {
            let length = std::str::from_utf8(value)
                .ok()
                .filter(|text| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|text| text.parse::<usize>().ok())
                .ok_or(Rejection::new(400, "invalid Content-Length"))?;
            if content_length.is_some_and(|previous| previous != length) {
                return Err(Rejection::new(400, "conflicting Content-Length headers"));
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case(b"chunked") || chunked {
                return Err(Rejection::new(
                    400,
                    "unsupported Transfer-Encoding (only chunked)",
                ));
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case(b"100-continue") {
                return Err(Rejection::new(417, "unsupported Expect"));
            }
            expect_continue = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for option in value.split(|&b| b == b',').map(trim) {
                if option.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if option.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("last-event-id") {
            last_event_id_header = Some(value);
        } else if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value);
        }
    }
    if chunked && content_length.is_some() {
        return Err(Rejection::new(
            400,
            "both Content-Length and Transfer-Encoding",
        ));
    }
    let body = if chunked {
        BodyKind::Chunked
    } else {
        BodyKind::Length(content_length.unwrap_or(0))
    };

    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let route = match path {
        "/events" => {
            if method != "GET" {
                return Err(Rejection::method("GET"));
            }
            let params = Params::parse(query)?;
            let last_event_id = match last_event_id_header {
                Some(value) => Some(
                    std::str::from_utf8(value)
                        .map_err(|_| Rejection::new(400, "Last-Event-ID is not UTF-8"))?
                        .to_owned(),
                ),
                None => params.last_event_id,
            };
            if last_event_id
                .as_ref()
                .is_some_and(|id| id.len() > LAST_EVENT_ID_BYTES_MAX)
            {
                return Err(Rejection::new(400, "Last-Event-ID too long"));
            }
            Route::Events {
                topics: checked_topics(params.topics, limits)?,
                last_event_id,
            }
        }
        "/publish" => {
            if method != "POST" {
                return Err(Rejection::method("POST"));
            }
            if let Some(expected) = &limits.authorization {
                if !authorization.is_some_and(|given| constant_time_eq(given, expected.as_bytes()))
                {
                    return Err(Rejection::new(
                        401,
                        "publishing requires Authorization: Bearer <token>",
                    ));
                }
            }
            if let BodyKind::Length(length) = body {
                if length > limits.body_bytes_max {
                    return Err(Rejection::new(413, "body too large"));
                }
            }
            let params = Params::parse(query)?;
            if let Some(event_type) = &params.event_type {
                if event_type.is_empty() || event_type.len() > EVENT_TYPE_BYTES_MAX {
                    return Err(Rejection::new(400, "event type empty or too long"));
                }
                if has_line_break(event_type) {
                    return Err(Rejection::new(400, "event type contains CR, LF or NUL"));
                }
            }
            Route::Publish {
                topics: checked_topics(params.topics, limits)?,
                event_type: params.event_type,
            }
        }
        "/metrics" | "/healthz" => {
            if method != "GET" {
                return Err(Rejection::method("GET"));
            }
            if path == "/metrics" {
                Route::Metrics
            } else {
                Route::Healthz
            }
        }
        _ => return Err(Rejection::new(404, "not found")),
    };
    Ok(Some(Request {
        route,
        head_len,
        body,
        expect_continue,
        keep_alive,
    }))
}

/// The query parameters Plenum reads.
#[derive(Debug, Default)]
struct Params {
    topics: Vec<String>,
    event_type: Option<String>,
    last_event_id: Option<String>,
}

impl Params {
    fn parse(query: &str) -> Result<Params, Rejection> {
        let mut params = Params::default();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match &*decode(key)? {
                "topic" => {
                    // Bound what is collected before the real limit is checked,
                    // so a flood of topics is never stored.
                    if params.topics.len() > TOPICS_COLLECTED_MAX {
                        return Err(Rejection::new(400, "too many topics"));
                    }
                    params.topics.push(decode(value)?);
                }
                "event" => params.event_type = Some(decode(value)?),
                "lastEventID" => params.last_event_id = Some(decode(value)?),
                _ => {}
            }
        }
        Ok(params)
    }
}

/// Form-style decoding (`+` is a space, `%XX` a byte), strict about UTF-8:
/// a lossy decode would silently turn a topic into another one.
fn decode(text: &str) -> Result<String, Rejection> {
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| Rejection::new(400, "query parameter is not UTF-8"))
}

fn checked_topics(topics: Vec<String>, limits: &Limits) -> Result<Vec<Topic>, Rejection> {
    if topics.is_empty() {
        return Err(Rejection::new(400, "missing topic parameter"));
    }
    if topics.len() > limits.topics_max {
        return Err(Rejection::new(400, "too many topics"));
    }
    let mut checked: Vec<Topic> = Vec::with_capacity(topics.len());
    for topic in topics {
        if topic.is_empty() || topic.len() > TOPIC_BYTES_MAX {
            return Err(Rejection::new(400, "topic empty or too long"));
        }
        if has_line_break(&topic) {
            return Err(Rejection::new(400, "topic contains CR, LF or NUL"));
        }
        if !checked.iter().any(|t| **t == *topic) {
            checked.push(Topic::from(topic));
        }
    }
    Ok(checked)
}

fn has_line_break(text: &str) -> bool {
    text.contains(['\r', '\n', '\0'])
}

fn trim(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &value[start..end]
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            head_bytes_max: 8192,
            body_bytes_max: 1024,
            topics_max: 4,
            authorization: Some("Bearer secret".into()),
        }
    }

    fn status(raw: &str) -> u16 {
        match parse_head(raw.as_bytes(), &limits()) {
            Ok(Some(_)) => 200,
            Ok(None) => 0,
            Err(rejection) => rejection.status,
        }
    }

    #[test]
    fn subscribe_route_with_topics_and_resume() {
        let request = parse_head(
            b"GET /events?topic=a&topic=b%2Fc&lastEventID=7 HTTP/1.1\r\nHost: x\r\n\r\n",
            &limits(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            request.route,
            Route::Events {
                topics: vec!["a".into(), "b/c".into()],
                last_event_id: Some("7".into())
            }
        );
        assert!(request.keep_alive);
    }

    #[test]
    fn the_header_wins_over_the_query_parameter() {
        let request = parse_head(
            b"GET /events?topic=a&lastEventID=7 HTTP/1.1\r\nLast-Event-ID: 9\r\n\r\n",
            &limits(),
        )
        .unwrap()
        .unwrap();
        assert!(
            matches!(request.route, Route::Events { last_event_id: Some(id), .. } if id == "9")
        );
    }

    #[test]
    fn statuses() {
        let auth = "Authorization: Bearer secret\r\n";
        let table: &[(&str, u16)] = &[
            ("GET /events?topic=a HTTP/1.1\r\n\r\n", 200),
            ("GET /events?topic=a HTTP/1.1\r\n", 0),
            ("GET /events HTTP/1.1\r\n\r\n", 400),
            ("GET /events?topic=%0Aevil HTTP/1.1\r\n\r\n", 400),
            ("GET /events?topic=a%0D HTTP/1.1\r\n\r\n", 400),
            ("GET /events?topic=a%00 HTTP/1.1\r\n\r\n", 400),
            ("GET /events?topic=%FF HTTP/1.1\r\n\r\n", 400),
            ("GET /events?topic=1&topic=2&topic=3&topic=4&topic=5 HTTP/1.1\r\n\r\n", 400),
            ("POST /events?topic=a HTTP/1.1\r\n\r\n", 405),
            ("GET /nope HTTP/1.1\r\n\r\n", 404),
            ("GARBAGE\r\n\r\n", 400),
            ("GET /events?topic=a HTTP/1.1\r\nBad Header\r\n\r\n", 400),
            ("POST /publish?topic=a HTTP/1.1\r\n\r\n", 401),
            ("POST /publish?topic=a HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n", 401),
            (&format!("POST /publish?topic=a HTTP/1.1\r\n{auth}\r\n"), 200),
            (&format!("POST /publish?topic=a HTTP/1.1\r\n{auth}Content-Length: 2000\r\n\r\n"), 413),
            (&format!("POST /publish?topic=a&event=a%0Ab HTTP/1.1\r\n{auth}\r\n"), 400),
            (
                &format!("POST /publish?topic=a HTTP/1.1\r\n{auth}Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
                400,
            ),
            (&format!("POST /publish?topic=a HTTP/1.1\r\n{auth}Transfer-Encoding: gzip\r\n\r\n"), 400),
            (&format!("POST /publish?topic=a HTTP/1.1\r\n{auth}Content-Length: -1\r\n\r\n"), 400),
            ("GET /metrics HTTP/1.1\r\n\r\n", 200),
            ("DELETE /healthz HTTP/1.1\r\n\r\n", 405),
        ];
        for (raw, expected) in table {
            assert_eq!(status(raw), *expected, "{raw:?}");
        }
    }

    #[test]
    fn oversized_heads_and_header_floods() {
        let long = format!(
            "GET /events?topic=a HTTP/1.1\r\nX: {}\r\n\r\n",
            "y".repeat(9000)
        );
        assert_eq!(status(&long), 431);
        let partial_long = format!("GET /events?topic=a HTTP/1.1\r\nX: {}", "y".repeat(9000));
        assert_eq!(status(&partial_long), 431);
        let flood: String = (0..70).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            status(&format!("GET /events?topic=a HTTP/1.1\r\n{flood}\r\n")),
            431
        );
    }

    #[test]
    fn http_1_0_closes_by_default() {
        let request = parse_head(b"GET /healthz HTTP/1.0\r\n\r\n", &limits())
            .unwrap()
            .unwrap();
        assert!(!request.keep_alive);
    }
}
