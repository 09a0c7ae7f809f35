//! The load benchmark's churner (`benches/load`): weight changes at a fixed rate through
//! rayshift's admin API (`PUT /v1/shards/<shard>/weights`) or HAProxy's admin socket (`set
//! weight`), until SIGTERM; then one line `CHURNJSON {...}` with what it did.
//!
//! ```text
//! churn (--admin PORT | --haproxy-socket PATH) [--rate 100] [--clusters a,b] [--shard shard-0]
//!       [--pattern flip|same] [--paused]
//! ```
//!
//! `flip` alternates all weight on the first cluster and all on the second; `same` puts it on the
//! first every time (the table is rebuilt, persisted and published, the traffic stays). With
//! `--paused` it starts paused; SIGUSR1 resumes, SIGUSR2 pauses (changes that fell due meanwhile
//! are dropped, not sent late).
//!
//! It shares the load generator's core, so what it spends is taken from wrk: one thread, requests
//! built once, one kept-alive connection; paused, it sleeps until a signal comes. A change slower
//! than the period delays the next ones, which then go out back to back until the rate is caught
//! up. A kept-alive connection the admin API closed while it was idle (reset, or closed before a
//! byte of the answer) gets the (idempotent) PUT again on a new one, as HTTP clients do.
//!
//! Signals are blocked except while it waits for the next change (`ppoll`): a pause, resume or
//! stop never interrupts a change in flight, and takes effect right after it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static ACTIVE: AtomicBool = AtomicBool::new(true);
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    match signal {
        libc::SIGUSR1 => ACTIVE.store(true, Ordering::SeqCst),
        libc::SIGUSR2 => ACTIVE.store(false, Ordering::SeqCst),
        _ => STOP.store(true, Ordering::SeqCst),
    }
}

/// Where the changes go.
enum Target {
    Admin(Admin),
    Haproxy(String),
}

impl Target {
    /// Sends one change and waits for its answer.
    fn change(&mut self, message: &[u8]) -> Outcome {
        match self {
            Target::Admin(admin) => admin.change(message),
            Target::Haproxy(path) => haproxy_change(path, message),
        }
    }
}

struct Args {
    target: Target,
    rate: f64,
    clusters: (String, String),
    shard: String,
    flip: bool,
    paused: bool,
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "churn: {problem}\nusage: churn (--admin PORT | --haproxy-socket PATH) [--rate 100] \
         [--clusters a,b] [--shard shard-0] [--pattern flip|same] [--paused]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut target = None;
    let mut rate = 100.0;
    let mut clusters = ("a".to_string(), "b".to_string());
    let mut shard = "shard-0".to_string();
    let mut flip = true;
    let mut paused = false;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--paused" {
            paused = true;
            continue;
        }
        let Some(value) = args.next() else {
            usage(&format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--admin" => {
                let port = value
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("--admin {value}: not a port")));
                target = Some(Target::Admin(Admin::new(port)));
            }
            "--haproxy-socket" => target = Some(Target::Haproxy(value)),
            "--rate" => {
                rate = value
                    .parse()
                    .ok()
                    .filter(|r: &f64| *r > 0.0 && r.is_finite())
                    .unwrap_or_else(|| usage(&format!("--rate {value}: not a positive number")));
            }
            "--clusters" => match value.split_once(',') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() => {
                    clusters = (a.to_string(), b.to_string())
                }
                _ => usage(&format!("--clusters {value}: two names with a comma")),
            },
            "--shard" => shard = value,
            "--pattern" => match value.as_str() {
                "flip" => flip = true,
                "same" => flip = false,
                _ => usage(&format!("--pattern {value}: flip or same")),
            },
            _ => usage(&format!("unknown argument {flag}")),
        }
    }
    let Some(target) = target else {
        usage("--admin or --haproxy-socket is required")
    };
    Args {
        target,
        rate,
        clusters,
        shard,
        flip,
        paused,
    }
}

/// The two messages, built once: `[0]` puts all weight on the first cluster, `[1]` on the second.
fn messages(args: &Args) -> [Vec<u8>; 2] {
    let (a, b) = (&args.clusters.0, &args.clusters.1);
    match &args.target {
        // The server taking the traffic first, so that no instant has both at weight 0.
        Target::Haproxy(_) => [
            format!("set weight be/{a} 100; set weight be/{b} 0\n").into_bytes(),
            format!("set weight be/{b} 100; set weight be/{a} 0\n").into_bytes(),
        ],
        Target::Admin(Admin { port, .. }) => [(a, b), (b, a)].map(|(up, down)| {
            let body =
                serde_json::json!({"weights": {up.as_str(): 100, down.as_str(): 0}}).to_string();
            format!(
                "PUT /v1/shards/{shard}/weights HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
                 Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n{body}",
                shard = args.shard,
                len = body.len()
            )
            .into_bytes()
        }),
    }
}

/// How one change ended.
type Outcome = Result<(), String>;

/// Reads one HTTP/1.1 answer from `conn` into `buf`: its status, and whether the connection
/// stays open. `Ok(None)`: closed before a byte of it came.
fn read_answer(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<(u16, bool)>> {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match conn.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(std::io::Error::other("closed in the middle of the answer"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let status = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("no status line"))?;
        let keep = !head.contains("\r\nconnection: close");
        let length = head.split("\r\n").find_map(|line| {
            let value = line.strip_prefix("content-length:")?;
            value.trim().parse::<usize>().ok()
        });
        let complete = match length {
            Some(len) => buf.len() >= head_end + 4 + len,
            None if head.contains("\r\ntransfer-encoding: chunked") => buf.ends_with(b"0\r\n\r\n"),
            None => return Err(std::io::Error::other("answer without a length")),
        };
        if complete {
            return Ok(Some((status, keep)));
        }
    }
}

/// The admin API over one kept-alive connection.
struct Admin {
    port: u16,
    conn: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Admin {
    /// The admin API on 127.0.0.1:`port`, not connected yet.
    fn new(port: u16) -> Admin {
        Admin {
            port,
            conn: None,
            buf: Vec::with_capacity(4096),
        }
    }

    fn connect(&self) -> std::io::Result<TcpStream> {
        let conn = TcpStream::connect(("127.0.0.1", self.port))?;
        conn.set_nodelay(true)?;
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(conn)
    }

    fn change(&mut self, message: &[u8]) -> Outcome {
        for attempt in 0..2 {
            let reused = self.conn.is_some();
            let mut conn = match self.conn.take() {
                Some(conn) => conn,
                None => self
                    .connect()
                    .map_err(|e| format!("connect: {}", e.kind()))?,
            };
            self.buf.clear();
            let answer = conn
                .write_all(message)
                .and_then(|()| read_answer(&mut conn, &mut self.buf));
            match answer {
                Ok(Some((status, keep))) => {
                    if keep {
                        self.conn = Some(conn);
                    }
                    if (200..300).contains(&status) {
                        return Ok(());
                    }
                    let body = self
                        .buf
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map_or(&[][..], |at| &self.buf[at + 4..]);
                    let body = String::from_utf8_lossy(&body[..body.len().min(100)]).into_owned();
                    return Err(format!("{status} {body}"));
                }
                // Closed (or reset) while idle, before a byte of the answer: once more, on a new
                // connection. Not after a timeout: the server may have applied that one.
                Ok(None) if reused && attempt == 0 => continue,
                Err(e) if reused && attempt == 0 && self.buf.is_empty() && closed(&e) => continue,
                Ok(None) => return Err("closed before the answer".to_string()),
                Err(e) => return Err(format!("{}: {e}", e.kind())),
            }
        }
        Err("closed before the answer".to_string())
    }
}

/// Whether `e` says the peer closed or reset the connection.
fn closed(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(
        e.kind(),
        BrokenPipe | ConnectionAborted | ConnectionReset | UnexpectedEof
    )
}

/// One command on HAProxy's admin socket (non-interactive: it answers, nothing on success, and
/// closes).
fn haproxy_change(path: &str, message: &[u8]) -> Outcome {
    let mut conn = UnixStream::connect(path).map_err(|e| format!("connect: {}", e.kind()))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    conn.write_all(message).map_err(|e| e.to_string())?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)
        .map_err(|e| format!("{}: {e}", e.kind()))?;
    match reply.trim() {
        "" => Ok(()),
        text => Err(text.chars().take(100).collect()),
    }
}

/// CPU time (user + system) this process used so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes the struct it is given and nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Installs the handlers and blocks the signals they handle; returns the mask to wait with
/// (those signals unblocked).
fn handle_signals() -> libc::sigset_t {
    const SIGNALS: [libc::c_int; 4] = [libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM, libc::SIGINT];
    // SAFETY: plain libc calls on sets owned here; the handler only stores to atomics, which is
    // async-signal-safe.
    unsafe {
        let mut handled: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut handled);
        for signal in SIGNALS {
            libc::sigaddset(&mut handled, signal);
        }
        let mut waiting: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &handled, &mut waiting);
        for signal in SIGNALS {
            libc::sigdelset(&mut waiting, signal);
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
        waiting
    }
}

/// Waits until `until` (for ever with `None`) or a signal, whichever comes first; signals are
/// taken only here.
fn wait(until: Option<Instant>, mask: &libc::sigset_t) {
    let timeout = until.map(|t| {
        let d = t.saturating_duration_since(Instant::now());
        libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        }
    });
    let timeout = timeout.as_ref().map_or(std::ptr::null(), |t| t as *const _);
    // SAFETY: no descriptors; `timeout` is null or points at a live timespec; `mask` is a valid set.
    unsafe { libc::ppoll(std::ptr::null_mut(), 0, timeout, mask) };
}

fn main() {
    let args = parse_args();
    ACTIVE.store(!args.paused, Ordering::SeqCst);
    let mask = handle_signals();
    let messages = messages(&args);
    let mut target = args.target;
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut latencies: Vec<Duration> = Vec::with_capacity(1 << 16);
    let mut ok = 0u64;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut sent = 0u64;
    let mut pending = 0u64;
    let mut next = Instant::now();
    let mut ticking = false;
    println!("CHURN started");
    let _ = std::io::stdout().flush();
    let cpu0 = cpu_time();
    let start = Instant::now();
    while !STOP.load(Ordering::SeqCst) {
        let now = Instant::now();
        if ACTIVE.load(Ordering::SeqCst) {
            if !ticking {
                (next, ticking) = (now, true);
            }
            while next <= now {
                pending += 1;
                next += period;
            }
        } else {
            (ticking, pending) = (false, 0);
        }
        let mut first = true;
        while pending > 0 {
            if !first {
                // Catching up after a slow change: take a pause or stop that came meanwhile
                // before sending the next one.
                wait(Some(Instant::now()), &mask);
                if !ACTIVE.load(Ordering::SeqCst) || STOP.load(Ordering::SeqCst) {
                    break;
                }
            }
            first = false;
            pending -= 1;
            let message = &messages[usize::from(args.flip && sent % 2 == 1)];
            sent += 1;
            let t = Instant::now();
            let outcome = target.change(message);
            latencies.push(t.elapsed());
            match outcome {
                Ok(()) => ok += 1,
                Err(e) => *errors.entry(e).or_default() += 1,
            }
        }
        // Until the next change is due (paused: until a signal).
        wait(ticking.then_some(next), &mask);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu0).as_secs_f64();
    latencies.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pct = |p: f64| {
        latencies
            .get(
                ((p / 100.0 * latencies.len() as f64) as usize)
                    .min(latencies.len().saturating_sub(1)),
            )
            .map_or(0.0, |d| ms(*d))
    };
    let failed: u64 = errors.values().sum();
    let stats = serde_json::json!({
        "sent": sent,
        "ok": ok,
        "failed": failed,
        "rate": ok as f64 / elapsed,
        "p50_ms": pct(50.0),
        "p99_ms": pct(99.0),
        "max_ms": latencies.last().map_or(0.0, |d| ms(*d)),
        "errors": errors,
        // Its own CPU (user + system) per change: taken from the load generator's core.
        "cpu_us_per_change": (sent > 0).then(|| 1e6 * cpu / sent as f64),
    });
    println!("CHURNJSON {stats}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// A loopback server that follows `script`: for each request it reads, the next entry's
    /// pieces are written one by one (`None`: the connection is closed instead). After the last
    /// entry it closes and returns how many connections it accepted.
    fn serve(script: Vec<Option<Vec<&'static [u8]>>>) -> (u16, thread::JoinHandle<usize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = thread::spawn(move || {
            let mut accepted = 0;
            let mut script = script.into_iter().peekable();
            // Bounded in time: a test whose client stops coming back fails instead of hanging.
            let deadline = Instant::now() + Duration::from_secs(10);
            listener.set_nonblocking(true).unwrap();
            'conns: loop {
                let mut conn = match listener.accept() {
                    Ok((conn, _)) => conn,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            && Instant::now() < deadline =>
                    {
                        thread::sleep(Duration::from_millis(2));
                        continue;
                    }
                    Err(_) => return accepted,
                };
                conn.set_nonblocking(false).unwrap();
                accepted += 1;
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                loop {
                    let mut request = [0u8; 4096];
                    match conn.read(&mut request) {
                        Ok(0) | Err(_) => continue 'conns,
                        Ok(_) => {}
                    }
                    match script.next() {
                        Some(Some(pieces)) => {
                            for piece in pieces {
                                conn.write_all(piece).unwrap();
                                conn.flush().unwrap();
                                thread::sleep(Duration::from_millis(5));
                            }
                        }
                        Some(None) if script.peek().is_some() => continue 'conns,
                        Some(None) | None => return accepted,
                    }
                    if script.peek().is_none() {
                        return accepted;
                    }
                }
            }
        });
        (port, handle)
    }

    #[test]
    fn answers_in_pieces_with_a_length_or_chunked() {
        let (port, server) = serve(vec![
            Some(vec![
                b"HTTP/1.1 200 OK\r\ncontent-le",
                b"ngth: 2\r\n\r\n{",
                b"}",
            ]),
            Some(vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n",
                b"0\r\n\r\n",
            ]),
            Some(vec![
                b"HTTP/1.1 409 Conflict\r\ncontent-length: 4\r\n\r\nbusy",
            ]),
        ]);
        let mut a = Admin::new(port);
        assert_eq!(a.change(b"PUT / HTTP/1.1\r\n\r\n"), Ok(()));
        assert_eq!(a.change(b"PUT / HTTP/1.1\r\n\r\n"), Ok(()));
        assert_eq!(
            a.change(b"PUT / HTTP/1.1\r\n\r\n"),
            Err("409 busy".to_string())
        );
        drop(a);
        assert_eq!(
            server.join().unwrap(),
            1,
            "one kept-alive connection for all three"
        );
    }

    #[test]
    fn a_kept_alive_connection_closed_while_idle_gets_the_change_again() {
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        // The first connection answers once, then closes when the second change comes.
        let (port, server) = serve(vec![Some(vec![answer]), None, Some(vec![answer])]);
        let mut a = Admin::new(port);
        assert_eq!(a.change(b"PUT / HTTP/1.1\r\n\r\n"), Ok(()));
        assert_eq!(a.change(b"PUT / HTTP/1.1\r\n\r\n"), Ok(()));
        drop(a);
        assert_eq!(
            server.join().unwrap(),
            2,
            "the change went again on a new connection"
        );
    }

    #[test]
    fn a_connection_closed_in_the_middle_of_an_answer_fails_the_change() {
        let (port, server) = serve(vec![Some(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}",
        ])]);
        let mut a = Admin::new(port);
        let outcome = a.change(b"PUT / HTTP/1.1\r\n\r\n");
        assert!(
            matches!(&outcome, Err(e) if e.contains("closed in the middle")),
            "{outcome:?}"
        );
        drop(a);
        assert_eq!(server.join().unwrap(), 1, "not sent again");
    }
}
