//! The relay on a hand-written edge-triggered epoll loop.

use crate::framing::{head_end, response_end, BUF};
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

struct Conn {
    client: TcpStream,
    upstream: TcpStream,
    buf: Vec<u8>,
    len: usize,
}

const LISTENER: u64 = u64::MAX;

fn register(epoll: i32, fd: i32, token: u64) -> std::io::Result<()> {
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
        u64: token,
    };
    // SAFETY: a valid epoll descriptor and event.
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Serves until the process is stopped.
pub fn run(port: u16, backend: u16) -> std::io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    listener.set_nonblocking(true)?;
    // SAFETY: plain system call.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(std::io::Error::last_os_error());
    }
    register(epoll, listener.as_raw_fd(), LISTENER)?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut freed: Vec<usize> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        // SAFETY: the buffer holds 256 events.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 256, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in &events[..n as usize] {
            let token = event.u64;
            if token == LISTENER {
                accept(epoll, &listener, backend, &mut conns, &mut free)?;
                continue;
            }
            let slot = (token >> 1) as usize;
            let Some(conn) = conns[slot].as_mut() else {
                continue;
            };
            if let Err(e) = on_readable(conn, token & 1 == 1) {
                if e.kind() != ErrorKind::UnexpectedEof {
                    eprintln!("floor epoll: connection ended: {e}");
                }
                conns[slot] = None;
                freed.push(slot);
            }
        }
        // Slots closed in this batch are reused only after it: a later event of the batch may
        // still name them.
        free.append(&mut freed);
    }
}

fn accept(
    epoll: i32,
    listener: &TcpListener,
    backend: u16,
    conns: &mut Vec<Option<Conn>>,
    free: &mut Vec<usize>,
) -> std::io::Result<()> {
    loop {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        client.set_nonblocking(true)?;
        client.set_nodelay(true)?;
        let upstream = match TcpStream::connect(("127.0.0.1", backend)) {
            Ok(upstream) => upstream,
            Err(e) => {
                eprintln!("floor epoll: backend: {e}");
                continue;
            }
        };
        upstream.set_nonblocking(true)?;
        upstream.set_nodelay(true)?;
        let slot = free.pop().unwrap_or_else(|| {
            conns.push(None);
            conns.len() - 1
        });
        register(epoll, client.as_raw_fd(), (slot as u64) << 1)?;
        register(epoll, upstream.as_raw_fd(), ((slot as u64) << 1) | 1)?;
        conns[slot] = Some(Conn {
            client,
            upstream,
            buf: vec![0; BUF],
            len: 0,
        });
    }
}

/// Reads what `from_upstream`'s side has; forwards a message once it is complete.
fn on_readable(conn: &mut Conn, from_upstream: bool) -> std::io::Result<()> {
    loop {
        if conn.len == conn.buf.len() {
            return Err(std::io::Error::other("message larger than the buffer"));
        }
        let (from, to) = if from_upstream {
            (&mut conn.upstream, &mut conn.client)
        } else {
            (&mut conn.client, &mut conn.upstream)
        };
        let n = match from.read(&mut conn.buf[conn.len..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        };
        // A read that did not fill the buffer drained the socket (as tokio assumes too).
        let drained = conn.len + n < conn.buf.len();
        conn.len += n;
        let end = if from_upstream {
            response_end(&conn.buf[..conn.len])
        } else {
            head_end(&conn.buf[..conn.len])
        };
        if let Some(end) = end {
            write_all(to, &conn.buf[..end])?;
            conn.len = 0;
            return Ok(());
        }
        if drained {
            return Ok(());
        }
    }
}

/// Writes all of `data` to a non-blocking socket, waiting in poll(2) if its buffer is full.
fn write_all(to: &mut TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match to.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: to.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 1000) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
