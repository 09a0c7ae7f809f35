//! The relay on io_uring: every completion of a batch queues the connection's next operation, and
//! one `io_uring_enter` submits them all and waits for the next completion.

use crate::framing::{head_end, response_end, BUF};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};

/// What a connection's one operation in flight is (the low bits of its user data).
#[derive(Clone, Copy, PartialEq)]
enum Op {
    RecvClient = 0,
    SendUpstream = 1,
    RecvUpstream = 2,
    SendClient = 3,
}

const ACCEPT: u64 = 7;

struct Conn {
    client: TcpStream,
    upstream: TcpStream,
    buf: Vec<u8>,
    /// Bytes received of the message being read.
    len: usize,
    /// The message being sent: `buf[sent..end]` is still to go.
    end: usize,
    sent: usize,
}

impl Conn {
    fn entry(&mut self, slot: usize, op: Op) -> squeue::Entry {
        let fd = match op {
            Op::RecvClient | Op::SendClient => self.client.as_raw_fd(),
            Op::SendUpstream | Op::RecvUpstream => self.upstream.as_raw_fd(),
        };
        let entry = match op {
            Op::RecvClient | Op::RecvUpstream => {
                let free = &mut self.buf[self.len..];
                opcode::Recv::new(types::Fd(fd), free.as_mut_ptr(), free.len() as u32).build()
            }
            Op::SendUpstream | Op::SendClient => {
                let out = &self.buf[self.sent..self.end];
                opcode::Send::new(types::Fd(fd), out.as_ptr(), out.len() as u32).build()
            }
        };
        entry.user_data(((slot as u64) << 3) | op as u64)
    }

    /// The operation after `op` completed with `n` bytes.
    fn next(&mut self, op: Op, n: usize) -> std::io::Result<Op> {
        Ok(match op {
            Op::RecvClient | Op::RecvUpstream => {
                self.len += n;
                let end = if op == Op::RecvClient {
                    head_end(&self.buf[..self.len])
                } else {
                    response_end(&self.buf[..self.len])
                };
                match end {
                    Some(end) => {
                        (self.end, self.sent, self.len) = (end, 0, 0);
                        if op == Op::RecvClient {
                            Op::SendUpstream
                        } else {
                            Op::SendClient
                        }
                    }
                    None if self.len == self.buf.len() => {
                        return Err(std::io::Error::other("message larger than the buffer"))
                    }
                    None => op,
                }
            }
            Op::SendUpstream | Op::SendClient => {
                self.sent += n;
                if self.sent < self.end {
                    op
                } else if op == Op::SendUpstream {
                    Op::RecvUpstream
                } else {
                    Op::RecvClient
                }
            }
        })
    }
}

/// Serves until the process is stopped.
pub fn run(port: u16, backend: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4096)
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("io_uring setup (needs Linux 6.1 or later with io_uring enabled): {e}"),
            )
        })?;
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
        .build()
        .user_data(ACCEPT);
    let mut queued: Vec<squeue::Entry> = vec![accept.clone()];
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut done: Vec<(u64, i32, u32)> = Vec::new();
    loop {
        for entry in queued.drain(..) {
            // SAFETY: every buffer an entry names lives in a `Conn` that stays until the
            // operation completes (a connection has one operation in flight).
            while unsafe { ring.submission().push(&entry) }.is_err() {
                ring.submit()?;
            }
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        done.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for (data, result, flags) in done.drain(..) {
            if data == ACCEPT {
                if let Some((client, upstream)) = accepted(result, backend) {
                    let slot = free.pop().unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    let mut conn = Conn {
                        client,
                        upstream,
                        buf: vec![0; BUF],
                        len: 0,
                        end: 0,
                        sent: 0,
                    };
                    queued.push(conn.entry(slot, Op::RecvClient));
                    conns[slot] = Some(conn);
                }
                if !cqueue::more(flags) {
                    queued.push(accept.clone());
                }
                continue;
            }
            let slot = (data >> 3) as usize;
            let op = match data & 7 {
                0 => Op::RecvClient,
                1 => Op::SendUpstream,
                2 => Op::RecvUpstream,
                _ => Op::SendClient,
            };
            let Some(conn) = conns[slot].as_mut() else {
                continue;
            };
            let next = if result <= 0 {
                Err(if result == 0 {
                    std::io::ErrorKind::UnexpectedEof.into()
                } else {
                    std::io::Error::from_raw_os_error(-result)
                })
            } else {
                conn.next(op, result as usize)
            };
            match next {
                Ok(next) => queued.push(conn.entry(slot, next)),
                Err(e) => {
                    if e.kind() != std::io::ErrorKind::UnexpectedEof {
                        eprintln!("floor uring: connection ended: {e}");
                    }
                    // Its one operation just completed: nothing of it is in flight.
                    conns[slot] = None;
                    free.push(slot);
                }
            }
        }
    }
}

/// The client an accept completion gave and a new connection to the backend for it.
fn accepted(result: i32, backend: u16) -> Option<(TcpStream, TcpStream)> {
    if result < 0 {
        eprintln!(
            "floor uring: accept: {}",
            std::io::Error::from_raw_os_error(-result)
        );
        return None;
    }
    // SAFETY: a descriptor the kernel just gave us, owned by nothing else.
    let client = unsafe { TcpStream::from_raw_fd(result) };
    let connected = TcpStream::connect(("127.0.0.1", backend)).and_then(|upstream| {
        client.set_nodelay(true)?;
        upstream.set_nodelay(true)?;
        Ok(upstream)
    });
    match connected {
        Ok(upstream) => Some((client, upstream)),
        Err(e) => {
            eprintln!("floor uring: backend: {e}");
            None
        }
    }
}
