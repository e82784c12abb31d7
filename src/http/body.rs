//! Request bodies: `Content-Length` or chunked, decoded incrementally.
//!
//! Chunk sizes are parsed by `httparse::parse_chunk_size`; this module only
//! walks the framing around them (data, CRLF, trailers) and bounds the
//! decoded size, so a body never grows past `--publish-body-bytes-max` and
//! malformed framing is a `400`, not a hang.

use super::Rejection;

/// The longest trailer line, or chunk-size line, tolerated, with its CRLF.
/// Enforced on complete lines and on incomplete ones alike, so the answer
/// does not depend on how the line was split across reads.
const FRAMING_LINE_BYTES_MAX: usize = 4096;

#[derive(Debug)]
pub enum BodyReader {
    Length { remaining: usize },
    Chunked(ChunkedDecoder),
}

impl BodyReader {
    /// Consumes framing and data from `input`, appending decoded bytes to
    /// `body` (at most `max` in all). Returns the bytes consumed and whether
    /// the body is complete.
    pub fn feed(
        &mut self,
        input: &[u8],
        body: &mut Vec<u8>,
        max: usize,
    ) -> Result<(usize, bool), Rejection> {
        match self {
            BodyReader::Length { remaining } => {
                let take = (*remaining).min(input.len());
                body.extend_from_slice(&input[..take]);
                *remaining -= take;
                Ok((take, *remaining == 0))
            }
            BodyReader::Chunked(decoder) => decoder.feed(input, body, max),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a chunk-size line.
    Size,
    /// Inside chunk data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after chunk data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder { state: State::Size }
    }
}

impl ChunkedDecoder {
    pub fn feed(
        &mut self,
        input: &[u8],
        body: &mut Vec<u8>,
        max: usize,
    ) -> Result<(usize, bool), Rejection> {
        const BAD: Rejection = Rejection::new(400, "malformed chunked body");
        let mut at = 0;
        loop {
            let rest = &input[at..];
            match self.state {
                State::Done => return Ok((at, true)),
                State::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        if used > FRAMING_LINE_BYTES_MAX {
                            return Err(BAD);
                        }
                        at += used;
                        if size > (max - body.len()) as u64 {
                            return Err(Rejection::new(413, "body too large"));
                        }
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) => {
                        // The line will be at least one byte longer than `rest`.
                        return if rest.len() >= FRAMING_LINE_BYTES_MAX {
                            Err(BAD)
                        } else {
                            Ok((at, false))
                        };
                    }
                    Err(_) => return Err(BAD),
                },
                State::Data(remaining) => {
                    if rest.is_empty() {
                        return Ok((at, false));
                    }
                    let take = (remaining as usize).min(rest.len());
                    body.extend_from_slice(&rest[..take]);
                    at += take;
                    let left = remaining - take as u64;
                    self.state = if left == 0 {
                        State::DataEnd
                    } else {
                        State::Data(left)
                    };
                }
                State::DataEnd => {
                    if rest.len() < 2 {
                        return if rest.is_empty() || rest == b"\r" {
                            Ok((at, false))
                        } else {
                            Err(BAD)
                        };
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(BAD);
                    }
                    at += 2;
                    self.state = State::Size;
                }
                State::Trailers => match rest.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        at += 2;
                        self.state = State::Done;
                    }
                    Some(end) if end + 2 > FRAMING_LINE_BYTES_MAX => return Err(BAD),
                    Some(end) => at += end + 2,
                    None => {
                        return if rest.len() >= FRAMING_LINE_BYTES_MAX {
                            Err(BAD)
                        } else {
                            Ok((at, false))
                        };
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_split(input: &[u8], split: usize) -> Result<Vec<u8>, Rejection> {
        let mut decoder = ChunkedDecoder::default();
        let mut body = Vec::new();
        let mut buffered = input[..split].to_vec();
        let (used, done) = decoder.feed(&buffered, &mut body, 100)?;
        buffered.drain(..used);
        assert!(!done || split == input.len() || used <= split);
        buffered.extend_from_slice(&input[split..]);
        let (used, done) = decoder.feed(&buffered, &mut body, 100)?;
        assert!(done, "not done after all input, split {split}");
        assert_eq!(
            used,
            buffered.len(),
            "trailing bytes belong to the next request"
        );
        Ok(body)
    }

    #[test]
    fn chunked_at_every_split() {
        let input = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\n";
        for split in 0..=input.len() {
            assert_eq!(
                decode_split(input, split).unwrap(),
                b"hello, world",
                "split {split}"
            );
        }
    }

    #[test]
    fn chunked_errors() {
        let mut body = Vec::new();
        assert_eq!(
            ChunkedDecoder::default()
                .feed(b"zz\r\n", &mut body, 100)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            ChunkedDecoder::default()
                .feed(b"2\r\nabXX", &mut body, 100)
                .unwrap_err()
                .status,
            400
        );
        body.clear();
        assert_eq!(
            ChunkedDecoder::default()
                .feed(b"ffff\r\n", &mut body, 100)
                .unwrap_err()
                .status,
            413
        );
        let endless_size = vec![b'1'; FRAMING_LINE_BYTES_MAX + 10];
        assert!(ChunkedDecoder::default()
            .feed(&endless_size, &mut body, 100)
            .is_err());
    }

    /// A framing line over the limit is refused whether it arrives whole or
    /// in pieces (it used to be accepted when it arrived in one read).
    #[test]
    fn overlong_framing_lines_are_refused_at_any_split() {
        let extension = "e".repeat(FRAMING_LINE_BYTES_MAX);
        let size_line = format!("1;{extension}\r\nx\r\n0\r\n\r\n");
        let trailer = format!("1\r\nx\r\n0\r\nT: {extension}\r\n\r\n");
        for input in [size_line, trailer] {
            for split in [0, 1, 100, FRAMING_LINE_BYTES_MAX, input.len()] {
                assert_eq!(
                    decode_split(input.as_bytes(), split).unwrap_err().status,
                    400,
                    "split {split}"
                );
            }
        }
        // The longest line allowed, with its CRLF, is accepted.
        let longest = format!(
            "1;{}\r\nx\r\n0\r\n\r\n",
            "e".repeat(FRAMING_LINE_BYTES_MAX - 4)
        );
        for split in [0, 1, 100, FRAMING_LINE_BYTES_MAX - 1, longest.len()] {
            assert_eq!(decode_split(longest.as_bytes(), split).unwrap(), b"x");
        }
    }

    #[test]
    fn length_bodies() {
        let mut reader = BodyReader::Length { remaining: 5 };
        let mut body = Vec::new();
        assert_eq!(reader.feed(b"he", &mut body, 100).unwrap(), (2, false));
        assert_eq!(reader.feed(b"lloGET", &mut body, 100).unwrap(), (3, true));
        assert_eq!(body, b"hello");
    }
}
