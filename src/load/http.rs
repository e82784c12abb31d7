//! The small amount of HTTP/1.1 client the load generator needs.
//!
//! - [`HttpUrl`]: `http://HOST[:PORT]/path?query`, where HOST is an IP literal
//!   or `localhost` (the tool never resolves names: it targets exactly the
//!   addresses it is given).
//! - Response heads are parsed with `httparse` ([`parse_response_head`]).
//! - [`ChunkedDecoder`]: an incremental decoder for `Transfer-Encoding:
//!   chunked` bodies. It is a byte-level state machine with a few integers of
//!   state, so a chunk header split across reads needs no buffer; that is why it
//!   is written here rather than buffering size lines for
//!   `httparse::parse_chunk_size`.
//! - [`Body`]: how a response body ends (length, chunked, or connection close).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{bail, Context};

/// Largest response head accepted, in bytes.
pub const RESPONSE_HEAD_BYTES_MAX: usize = 16 * 1024;

/// Most headers parsed from one response head.
pub const RESPONSE_HEADERS_MAX: usize = 64;

/// A parsed `http://` URL whose host is an address, not a name.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HttpUrl {
    /// Where to connect.
    pub address: SocketAddr,
    /// The `Host` header value, as written in the URL (with the port if given).
    pub host_header: String,
    /// Path and query, starting with `/`.
    pub target: String,
}

impl HttpUrl {
    /// Parses `http://HOST[:PORT][/path][?query]`.
    pub fn parse(text: &str) -> anyhow::Result<HttpUrl> {
        let rest = text
            .strip_prefix("http://")
            .with_context(|| format!("{text:?}: only http:// URLs are supported"))?;
        let (authority, target) = match rest.find(['/', '?']) {
            Some(index) if rest.as_bytes()[index] == b'/' => {
                (&rest[..index], rest[index..].to_owned())
            }
            Some(index) => (&rest[..index], format!("/{}", &rest[index..])),
            None => (rest, "/".to_owned()),
        };
        if let Some(fragment) = target.find('#') {
            bail!(
                "{text:?}: a fragment ({}) has no meaning here",
                &target[fragment..]
            );
        }
        if authority.contains('@') {
            bail!("{text:?}: credentials in the URL are not supported");
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .with_context(|| format!("{text:?}: unclosed '[' in the host"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .with_context(|| format!("{text:?}: bad port"))?,
                ),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port: u16 = match port {
            Some(port) => port
                .parse()
                .with_context(|| format!("{text:?}: bad port {port:?}"))?,
            None => 80,
        };
        let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse().with_context(|| {
                format!("{text:?}: the host must be an IP literal or localhost (names are not resolved)")
            })?
        };
        if target.bytes().any(|byte| byte <= b' ' || byte == 0x7f) {
            bail!("{text:?}: the path contains spaces or control characters");
        }
        Ok(HttpUrl {
            address: SocketAddr::new(ip, port),
            host_header: authority.to_owned(),
            target,
        })
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.host_header, self.target)
    }
}

/// Writes the subscribe request for `url` into `out` (cleared first).
pub fn write_subscribe_request(out: &mut Vec<u8>, url: &HttpUrl, last_event_id: Option<&[u8]>) {
    out.clear();
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(url.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(url.host_header.as_bytes());
    out.extend_from_slice(
        b"\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: plenum-load\r\n",
    );
    if let Some(id) = last_event_id {
        debug_assert!(!id.contains(&b'\r') && !id.contains(&b'\n'));
        out.extend_from_slice(b"Last-Event-ID: ");
        out.extend_from_slice(id);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `Content-Length`: this many bytes remain.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked(ChunkedDecoder),
    /// Neither: the body ends when the server closes the connection.
    UntilClose,
}

/// What mattered in a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The status code.
    pub status: u16,
    /// Bytes of the head, including the blank line.
    pub head_bytes: usize,
    /// How the body is delimited.
    pub body: Body,
    /// The `Content-Type` starts with `text/event-stream`.
    pub is_event_stream: bool,
    /// The server said `Connection: close` (or answered as HTTP/1.0 without keep-alive).
    pub is_connection_close: bool,
}

/// Why a response head could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Not a valid HTTP/1.x response head.
    Malformed,
    /// Longer than [`RESPONSE_HEAD_BYTES_MAX`].
    TooLong,
}

/// Parses a response head from the start of `bytes`: `Ok(None)` while incomplete.
pub fn parse_response_head(bytes: &[u8]) -> Result<Option<ResponseHead>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; RESPONSE_HEADERS_MAX];
    let mut response = httparse::Response::new(&mut headers);
    let head_bytes = match response.parse(bytes) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => {
            return if bytes.len() > RESPONSE_HEAD_BYTES_MAX {
                Err(HeadError::TooLong)
            } else {
                Ok(None)
            };
        }
        Err(_) => return Err(HeadError::Malformed),
    };
    let status = response.code.ok_or(HeadError::Malformed)?;
    let mut content_length = None;
    let mut is_chunked = false;
    let mut is_event_stream = false;
    let mut connection_close = response.version == Some(0);
    for header in response.headers.iter() {
        let value = header.value;
        if header.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(value).map_err(|_| HeadError::Malformed)?;
            content_length = Some(
                text.trim()
                    .parse::<u64>()
                    .map_err(|_| HeadError::Malformed)?,
            );
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            is_chunked = value
                .split(|&byte| byte == b',')
                .any(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if header.name.eq_ignore_ascii_case("content-type") {
            is_event_stream = value.trim_ascii_start().len() >= 17
                && value.trim_ascii_start()[..17].eq_ignore_ascii_case(b"text/event-stream");
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&byte| byte == b',') {
                if token.trim_ascii().eq_ignore_ascii_case(b"close") {
                    connection_close = true;
                } else if token.trim_ascii().eq_ignore_ascii_case(b"keep-alive") {
                    connection_close = false;
                }
            }
        }
    }
    let body = if is_chunked {
        Body::Chunked(ChunkedDecoder::default())
    } else if let Some(length) = content_length {
        Body::Length(length)
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Body::Length(0)
    } else {
        Body::UntilClose
    };
    Ok(Some(ResponseHead {
        status,
        head_bytes,
        body,
        is_event_stream,
        is_connection_close: connection_close,
    }))
}

/// Where the chunked decoder is within the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkState {
    /// Reading the hex digits of a chunk size.
    #[default]
    Size,
    /// Past the size: skipping chunk extensions up to the LF.
    Extension,
    /// Inside chunk data: this many bytes remain.
    Data,
    /// After chunk data: expecting CR (or a bare LF).
    DataCr,
    /// After chunk data and CR: expecting LF.
    DataLf,
    /// After the last (zero) chunk: at the start of a trailer line.
    TrailerLineStart,
    /// Inside a trailer line, skipping to its LF.
    TrailerLine,
    /// The body is complete.
    Done,
}

/// Why a chunked body cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkError {
    /// A byte that the chunked grammar does not allow there.
    Malformed,
}

/// Incremental `Transfer-Encoding: chunked` decoder (RFC 9112 section 7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// The chunk size being read, or the data bytes left in the chunk.
    remaining: u64,
    /// Hex digits read for the current size (bounds the size to 16 digits).
    size_digits: u8,
}

impl ChunkedDecoder {
    /// The terminating chunk and trailers have been read.
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes `input`, handing each piece of body data to `data`. Returns the
    /// bytes consumed: all of `input`, or fewer when the body ended inside it.
    pub fn decode(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<usize, ChunkError> {
        let mut index = 0;
        while index < input.len() {
            let byte = input[index];
            match self.state {
                ChunkState::Size => {
                    let digit = match byte {
                        b'0'..=b'9' => byte - b'0',
                        b'a'..=b'f' => byte - b'a' + 10,
                        b'A'..=b'F' => byte - b'A' + 10,
                        b';' | b' ' | b'\t' | b'\r' | b'\n' if self.size_digits > 0 => {
                            self.state = ChunkState::Extension;
                            continue; // Handle this byte as part of the extension.
                        }
                        _ => return Err(ChunkError::Malformed),
                    };
                    if self.size_digits == 16 {
                        return Err(ChunkError::Malformed);
                    }
                    self.size_digits += 1;
                    self.remaining = self.remaining << 4 | u64::from(digit);
                    index += 1;
                }
                ChunkState::Extension => {
                    index += 1;
                    if byte == b'\n' {
                        self.size_digits = 0;
                        self.state = if self.remaining == 0 {
                            ChunkState::TrailerLineStart
                        } else {
                            ChunkState::Data
                        };
                    }
                }
                ChunkState::Data => {
                    let available = (input.len() - index) as u64;
                    let take = available.min(self.remaining) as usize;
                    data(&input[index..index + take]);
                    index += take;
                    self.remaining -= take as u64;
                    if self.remaining == 0 {
                        self.state = ChunkState::DataCr;
                    }
                }
                ChunkState::DataCr => {
                    index += 1;
                    self.state = match byte {
                        b'\r' => ChunkState::DataLf,
                        b'\n' => ChunkState::Size,
                        _ => return Err(ChunkError::Malformed),
                    };
                }
                ChunkState::DataLf => {
                    index += 1;
                    if byte != b'\n' {
                        return Err(ChunkError::Malformed);
                    }
                    self.state = ChunkState::Size;
                }
                ChunkState::TrailerLineStart => {
                    index += 1;
                    self.state = match byte {
                        b'\n' => {
                            self.state = ChunkState::Done;
                            return Ok(index);
                        }
                        b'\r' => ChunkState::TrailerLineStart,
                        _ => ChunkState::TrailerLine,
                    };
                }
                ChunkState::TrailerLine => {
                    index += 1;
                    if byte == b'\n' {
                        self.state = ChunkState::TrailerLineStart;
                    }
                }
                ChunkState::Done => return Ok(index),
            }
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let url = HttpUrl::parse("http://127.0.0.1:8080/events?topic=a").unwrap();
        assert_eq!(url.address, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(url.host_header, "127.0.0.1:8080");
        assert_eq!(url.target, "/events?topic=a");
        let url = HttpUrl::parse("http://localhost/").unwrap();
        assert_eq!(url.address, "127.0.0.1:80".parse().unwrap());
        let url = HttpUrl::parse("http://[::1]:9000?x=1").unwrap();
        assert_eq!(url.address, "[::1]:9000".parse().unwrap());
        assert_eq!(url.target, "/?x=1");
        assert_eq!(HttpUrl::parse("http://10.1.2.3").unwrap().target, "/");
        assert!(HttpUrl::parse("https://127.0.0.1/").is_err());
        assert!(HttpUrl::parse("http://example.com/").is_err());
        assert!(HttpUrl::parse("http://127.0.0.1:99999/").is_err());
        assert!(HttpUrl::parse("http://127.0.0.1/a b").is_err());
        assert!(HttpUrl::parse("http://u@127.0.0.1/").is_err());
    }

    #[test]
    fn subscribe_request() {
        let url = HttpUrl::parse("http://127.0.0.1:8080/events?topic=a").unwrap();
        let mut out = Vec::new();
        write_subscribe_request(&mut out, &url, Some(b"42"));
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("GET /events?topic=a HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
        assert!(text.contains("Accept: text/event-stream\r\n"));
        assert!(text.contains("Cache-Control: no-cache\r\n"));
        assert!(text.ends_with("Last-Event-ID: 42\r\n\r\n"));
    }

    #[test]
    fn response_heads() {
        let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\r\n:ok";
        let parsed = parse_response_head(head).unwrap().unwrap();
        assert_eq!(parsed.status, 200);
        assert_eq!(parsed.head_bytes, head.len() - 3);
        assert_eq!(parsed.body, Body::UntilClose);
        assert!(parsed.is_event_stream);
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\ncontent-type: TEXT/EVENT-STREAM\r\n\r\n";
        let parsed = parse_response_head(head).unwrap().unwrap();
        assert!(matches!(parsed.body, Body::Chunked(_)));
        assert!(parsed.is_event_stream);
        let head = b"HTTP/1.1 503 Busy\r\nContent-Length: 5\r\nConnection: close\r\n\r\n";
        let parsed = parse_response_head(head).unwrap().unwrap();
        assert_eq!(
            (parsed.status, parsed.body, parsed.is_event_stream),
            (503, Body::Length(5), false)
        );
        assert!(parsed.is_connection_close);
        assert_eq!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nA: b\r\n"),
            Ok(None)
        );
        assert_eq!(
            parse_response_head(b"garbage\r\n\r\n"),
            Err(HeadError::Malformed)
        );
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.resize(RESPONSE_HEAD_BYTES_MAX + 10, b'a');
        assert_eq!(parse_response_head(&long), Err(HeadError::TooLong));
    }

    fn decode_pieces(pieces: &[&[u8]]) -> Result<(Vec<u8>, bool, usize), ChunkError> {
        let mut decoder = ChunkedDecoder::default();
        let mut out = Vec::new();
        let mut consumed = 0;
        for piece in pieces {
            consumed += decoder.decode(piece, |data| out.extend_from_slice(data))?;
        }
        Ok((out, decoder.is_done(), consumed))
    }

    #[test]
    fn chunked_table_split_everywhere() {
        let cases: &[(&[u8], &[u8], bool)] = &[
            (b"5\r\nhello\r\n0\r\n\r\n", b"hello", true),
            (b"3\r\nabc\r\nA\r\n0123456789\r\n", b"abc0123456789", false),
            (b"3;ext=1\r\nabc\r\n0\r\nTrailer: x\r\n\r\n", b"abc", true),
            (b"1\nx\n0\n\n", b"x", true),
            (b"9\r\ndata: a\n\n\r\n", b"data: a\n\n", false),
            (b"5 \r\nhello\r\n0\r\n\r\n", b"hello", true),
        ];
        for &(stream, expected, done) in cases {
            for split in 0..=stream.len() {
                let (a, b) = stream.split_at(split);
                let (out, is_done, consumed) = decode_pieces(&[a, b]).unwrap();
                assert_eq!(out, expected, "{stream:?} split at {split}");
                assert_eq!(is_done, done, "{stream:?} split at {split}");
                assert_eq!(consumed, stream.len());
            }
        }
    }

    #[test]
    fn chunked_stops_at_end_of_body() {
        let (out, done, consumed) = decode_pieces(&[b"1\r\nx\r\n0\r\n\r\nHTTP/1.1"]).unwrap();
        assert_eq!((out.as_slice(), done, consumed), (&b"x"[..], true, 11));
    }

    #[test]
    fn chunked_errors() {
        assert_eq!(decode_pieces(&[b"zz\r\n"]), Err(ChunkError::Malformed));
        assert_eq!(decode_pieces(&[b"\r\n"]), Err(ChunkError::Malformed));
        assert_eq!(decode_pieces(&[b"1\r\nxy\r\n"]), Err(ChunkError::Malformed));
        assert_eq!(
            decode_pieces(&[b"11111111111111111\r\n"]),
            Err(ChunkError::Malformed)
        );
    }
}
