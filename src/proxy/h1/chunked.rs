//! Finding the end of a chunked body (RFC 9112 section 7.1) that is forwarded as it is: the direct
//! path copies the cluster's chunks unchanged and only needs to know where the message ends.

/// Where a scan is inside a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In the chunk size; `digits` read so far.
    Size {
        value: u64,
        digits: u8,
    },
    /// After the size, in whitespace: `;` starts an extension, CR ends the line.
    SizeWs {
        value: u64,
    },
    /// In a chunk extension, up to CR.
    Extension {
        value: u64,
    },
    /// After the size line's CR.
    SizeLf {
        value: u64,
    },
    /// Chunk data, this many bytes left.
    Data(u64),
    /// After the data: CR, then LF.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final empty line).
    LineStart,
    /// In a trailer field, up to CR.
    Trailer,
    TrailerLf,
    /// After the final empty line's CR.
    FinalLf,
    /// The body has ended.
    Done,
}

/// A malformed chunked body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed chunked body")]
pub struct BadChunk;

/// Scans a chunked body as it arrives.
#[derive(Debug, Clone)]
pub struct Scanner {
    state: State,
}

impl Default for Scanner {
    fn default() -> Self {
        Self {
            state: State::Size {
                value: 0,
                digits: 0,
            },
        }
    }
}

impl Scanner {
    /// True once the last chunk and the trailer section have been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes `bytes`; returns how many belong to the body (all of them unless it ended inside).
    pub fn scan(&mut self, bytes: &[u8]) -> Result<usize, BadChunk> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                State::Done => return Ok(i),
                State::Data(n) => {
                    // Skip the data in one step.
                    let take = n.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == n {
                        State::DataCr
                    } else {
                        State::Data(n - take)
                    };
                    continue;
                }
                State::Size { value, digits } => match (b as char).to_digit(16) {
                    Some(d) if digits < 15 => State::Size {
                        value: value << 4 | u64::from(d),
                        digits: digits + 1,
                    },
                    Some(_) => return Err(BadChunk),
                    None if digits == 0 => return Err(BadChunk),
                    None if b == b';' => State::Extension { value },
                    None if b == b' ' || b == b'\t' => State::SizeWs { value },
                    None if b == b'\r' => State::SizeLf { value },
                    None => return Err(BadChunk),
                },
                State::SizeWs { value } => match b {
                    b' ' | b'\t' => State::SizeWs { value },
                    b';' => State::Extension { value },
                    b'\r' => State::SizeLf { value },
                    _ => return Err(BadChunk),
                },
                // Extensions and trailer fields are passed on as they came: no control bytes
                // (NUL, bare LF, ...) but tab in them.
                State::Extension { value } => match b {
                    b'\r' => State::SizeLf { value },
                    _ if is_control(b) => return Err(BadChunk),
                    _ => State::Extension { value },
                },
                State::SizeLf { value } => match (b, value) {
                    (b'\n', 0) => State::LineStart,
                    (b'\n', n) => State::Data(n),
                    _ => return Err(BadChunk),
                },
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataLf if b == b'\n' => State::Size {
                    value: 0,
                    digits: 0,
                },
                State::DataCr | State::DataLf => return Err(BadChunk),
                State::LineStart if b == b'\r' => State::FinalLf,
                State::LineStart | State::Trailer if b == b'\r' => State::TrailerLf,
                State::LineStart | State::Trailer if is_control(b) => return Err(BadChunk),
                State::LineStart | State::Trailer => State::Trailer,
                State::TrailerLf if b == b'\n' => State::LineStart,
                State::FinalLf if b == b'\n' => State::Done,
                State::TrailerLf | State::FinalLf => return Err(BadChunk),
            };
            i += 1;
        }
        Ok(i)
    }
}

/// A control byte other than tab (`\n` included), or DEL.
fn is_control(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `body` in pieces of `step` bytes; returns the bytes that belonged to it.
    fn scan_in_steps(body: &[u8], step: usize) -> Result<(usize, bool), BadChunk> {
        let mut s = Scanner::default();
        let mut used = 0;
        for piece in body.chunks(step) {
            let n = s.scan(piece)?;
            used += n;
            if n < piece.len() {
                break;
            }
        }
        Ok((used, s.is_done()))
    }

    #[test]
    fn bodies_end_where_the_last_chunk_and_trailers_end_in_any_split() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n3 \t;a=\"b c\"\r\nxyz\r\n4 \r\nabcd\r\n0\r\nx-sum: 1\r\n\r\n";
        let mut with_next = body.to_vec();
        with_next.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        for step in 1..=with_next.len() {
            assert_eq!(
                scan_in_steps(&with_next, step),
                Ok((body.len(), true)),
                "step {step}"
            );
        }
        assert_eq!(scan_in_steps(b"0\r\n\r\n", 1), Ok((5, true)));
        assert_eq!(scan_in_steps(b"A\r\n0123456789\r\n", 4), Ok((15, false)));
    }

    #[test]
    fn malformed_bodies_are_errors() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b"5\nhello",
            b"5\r\nhelloXX",
            b"ffffffffffffffffff\r\n",
            b"0\r\nbad\nline\r\n\r\n",
            b"0\r\n\rX",
            b"5 junk\r\nhello\r\n0\r\n\r\n",
            b"5;a\0b\r\nhello\r\n0\r\n\r\n",
            b"5;a\x7f\r\nhello\r\n0\r\n\r\n",
            b"0\r\nx-sum: \x01\r\n\r\n",
        ] {
            assert_eq!(scan_in_steps(bad, 64), Err(BadChunk), "{bad:?}");
        }
    }
}
