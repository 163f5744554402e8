//! The load client: one tokio FTP client used for every path, run as a child
//! process (`xtask bench-load ...`) so that the harness can spread thousands
//! of sessions over several processes (each under the open-file limit) and
//! account for the client's CPU separately.
//!
//! Three modes:
//! - `rate`: `concurrency` workers open sessions back to back for `secs`
//!   seconds: connect, banner, `USER`/`PASS`, `PWD`, optionally `EPSV` +
//!   `LIST` (the listing read to its end), `QUIT`. Prints one result line.
//! - `idle`: opens `count` logged-in sessions (at most `in_flight` at a
//!   time), prints a result line, holds them until its standard input
//!   closes or says anything, then drops them all.
//! - `slow`: `count` concurrent downloads (`TYPE I`, `EPSV`, `RETR`) of one
//!   file, each read at `rate` bytes per second as `curl --limit-rate`
//!   does (read, then sleep until the average is back at the rate), each
//!   checked for its size and [`Digest`]. Prints one result line.
//!
//! Every step has a timeout, every loop a bound in count or time.

use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One step of a session may take this long before the session fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);
/// Lines in one reply (multi-line banners) before the reply is refused.
const MAX_REPLY_LINES: usize = 64;
/// Bytes of one LIST before the listing is refused.
const MAX_LISTING: usize = 1 << 20;

/// What `xtask bench-load` is asked to do.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// Sessions per second.
    Rate {
        /// Control address of the path.
        #[arg(long)]
        addr: SocketAddr,
        /// Concurrent workers.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Seconds to run.
        #[arg(long)]
        secs: f64,
        /// Add EPSV + LIST to every session.
        #[arg(long)]
        list: bool,
    },
    /// Concurrent rate-limited downloads, checked byte for byte.
    Slow {
        /// Control address of the path.
        #[arg(long)]
        addr: SocketAddr,
        /// Downloads.
        #[arg(long)]
        count: usize,
        /// Logins and data setups in progress at once.
        #[arg(long, default_value_t = 24)]
        in_flight: usize,
        /// The file to retrieve.
        #[arg(long)]
        path: String,
        /// Its size in bytes.
        #[arg(long)]
        size: u64,
        /// Its digest ([`Digest`], 16 hex digits).
        #[arg(long)]
        digest: String,
        /// Bytes per second each download reads.
        #[arg(long)]
        rate: u64,
        /// Give up on the downloads still running after this many seconds.
        #[arg(long)]
        secs: u64,
    },
    /// Idle logged-in sessions.
    Idle {
        /// Control address of the path.
        #[arg(long)]
        addr: SocketAddr,
        /// Sessions to open.
        #[arg(long)]
        count: usize,
        /// Logins in progress at once.
        #[arg(long, default_value_t = 32)]
        in_flight: usize,
        /// Give up opening after this many seconds.
        #[arg(long, default_value_t = 300)]
        open_secs: u64,
        /// Drop the sessions after this many seconds even if stdin stays open.
        #[arg(long, default_value_t = 900)]
        hold_secs: u64,
    },
}

/// Runs the load client (the `bench-load` subcommand).
pub fn main(args: LoadArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the client runtime")?;
    match args.mode {
        Mode::Rate {
            addr,
            concurrency,
            secs,
            list,
        } => {
            let result = runtime.block_on(rate(addr, concurrency, secs, list));
            println!(
                "rate ok={} failed={} secs={:.6} first_error={}",
                result.ok,
                result.failed,
                result.secs,
                result
                    .first_error
                    .as_deref()
                    .unwrap_or("-")
                    .replace(' ', "_")
            );
            Ok(())
        }
        Mode::Idle {
            addr,
            count,
            in_flight,
            open_secs,
            hold_secs,
        } => runtime.block_on(idle(addr, count, in_flight, open_secs, hold_secs)),
        Mode::Slow {
            addr,
            count,
            in_flight,
            path,
            size,
            digest,
            rate,
            secs,
        } => {
            let digest = u64::from_str_radix(&digest, 16)
                .with_context(|| format!("--digest {digest:?}: not 16 hex digits"))?;
            let want = Expected {
                path,
                size,
                digest,
                rate: rate.max(1),
            };
            let r = runtime.block_on(slow(addr, count, in_flight, want, secs));
            println!(
                "slow ok={} failed={} mismatched={} secs={:.3} median_secs={:.3} longest_secs={:.3} first_error={}",
                r.ok,
                r.failed,
                r.mismatched,
                r.secs,
                r.median_secs,
                r.longest_secs,
                r.first_error.as_deref().unwrap_or("-").replace(' ', "_")
            );
            Ok(())
        }
    }
}

/// A digest of a byte stream, the same whatever the read sizes: 64-bit
/// words (little endian) mixed with a multiply and a rotation, the tail
/// padded with zeros, then the length. Not cryptographic: it tells a
/// download that lost, repeated, or reordered bytes from a good one, at a
/// few GB/s, so a thousand clients on the client host can check every
/// byte.
#[derive(Debug, Clone)]
pub struct Digest {
    h: u64,
    carry: [u8; 8],
    carried: usize,
    len: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            h: 0xcbf2_9ce4_8422_2325,
            carry: [0; 8],
            carried: 0,
            len: 0,
        }
    }
}

impl Digest {
    fn mix(&mut self, word: u64) {
        self.h = (self.h ^ word)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }

    /// Adds `data`.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.carried > 0 {
            let take = (8 - self.carried).min(data.len());
            let (head, rest) = data.split_at(take);
            if let Some(dst) = self.carry.get_mut(self.carried..self.carried + take) {
                dst.copy_from_slice(head);
            }
            self.carried += take;
            data = rest;
            if self.carried < 8 {
                return;
            }
            let w = u64::from_le_bytes(self.carry);
            self.mix(w);
            self.carried = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in words.by_ref() {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.mix(u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        if let Some(dst) = self.carry.get_mut(..rest.len()) {
            dst.copy_from_slice(rest);
        }
        self.carried = rest.len();
    }

    /// The digest of everything added.
    pub fn finish(mut self) -> u64 {
        if self.carried > 0 {
            let mut b = [0u8; 8];
            if let (Some(dst), Some(src)) =
                (b.get_mut(..self.carried), self.carry.get(..self.carried))
            {
                dst.copy_from_slice(src);
            }
            self.mix(u64::from_le_bytes(b));
        }
        let len = self.len;
        self.mix(len);
        self.h
    }
}

/// A session's control connection.
struct Control {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    peer: IpAddr,
    line: String,
}

async fn step<T>(what: &str, f: impl Future<Output = Result<T>>) -> Result<T> {
    match tokio::time::timeout(STEP_TIMEOUT, f).await {
        Ok(r) => r,
        Err(_) => bail!("{what}: timeout"),
    }
}

impl Control {
    async fn connect(addr: SocketAddr) -> Result<Control> {
        let stream = step("connect", async {
            TcpStream::connect(addr).await.context("connect")
        })
        .await?;
        // Commands are single small writes; don't let Nagle hold them.
        stream.set_nodelay(true).context("nodelay")?;
        let (r, w) = stream.into_split();
        Ok(Control {
            reader: BufReader::with_capacity(1024, r),
            writer: w,
            peer: addr.ip(),
            line: String::new(),
        })
    }

    /// Reads one reply (multi-line aware) and returns its code and last line.
    async fn reply(&mut self) -> Result<(u16, String)> {
        let reader = &mut self.reader;
        let line = &mut self.line;
        step("reply", async move {
            let mut code: Option<u16> = None;
            for _ in 0..MAX_REPLY_LINES {
                line.clear();
                let n = reader.read_line(line).await.context("read reply")?;
                if n == 0 {
                    bail!("connection closed before a reply");
                }
                let text = line.trim_end();
                let this = text.get(..3).and_then(|c| c.parse::<u16>().ok());
                let sep = text.as_bytes().get(3).copied();
                match (code, this) {
                    (None, Some(c)) if sep == Some(b'-') => code = Some(c),
                    (None, Some(c)) => return Ok((c, text.to_owned())),
                    (Some(c), Some(t)) if c == t && sep != Some(b'-') => {
                        return Ok((c, text.to_owned()));
                    }
                    (None, None) => bail!("not a reply: {text}"),
                    _ => {}
                }
            }
            bail!("reply longer than {MAX_REPLY_LINES} lines")
        })
        .await
    }

    async fn command(&mut self, line: &str) -> Result<(u16, String)> {
        let writer = &mut self.writer;
        step("send", async {
            writer
                .write_all(format!("{line}\r\n").as_bytes())
                .await
                .context("send")
        })
        .await?;
        self.reply().await
    }

    async fn expect(&mut self, line: &str, codes: &[u16]) -> Result<u16> {
        let (code, text) = self.command(line).await?;
        if !codes.contains(&code) {
            let verb = line.split(' ').next().unwrap_or(line);
            bail!("{verb}: {text}");
        }
        Ok(code)
    }

    /// Banner, USER, PASS: a logged-in session.
    async fn login(addr: SocketAddr) -> Result<Control> {
        let mut c = Control::connect(addr).await?;
        let (code, text) = c.reply().await?;
        if code != 220 {
            bail!("banner: {text}");
        }
        // mod_proxy mishandles a 230 sent straight after USER, so the
        // server is configured to ask for a password, and one is given.
        if c.expect("USER anonymous", &[230, 331]).await? == 331 {
            c.expect("PASS bench@example.org", &[230]).await?;
        }
        Ok(c)
    }

    /// EPSV, or PASV where EPSV is refused (as curl does): the port.
    async fn passive(&mut self) -> Result<u16> {
        let (code, text) = self.command("EPSV").await?;
        Ok(match code {
            229 => parse_epsv(&text).with_context(|| format!("EPSV: {text}"))?,
            500..=599 => {
                let (code, text) = self.command("PASV").await?;
                if code != 227 {
                    bail!("PASV: {text}");
                }
                parse_pasv_port(&text).with_context(|| format!("PASV: {text}"))?
            }
            _ => bail!("EPSV: {text}"),
        })
    }

    /// EPSV (PASV where EPSV is refused, as curl does) + LIST: reads the
    /// listing to its end and the final reply.
    async fn list(&mut self) -> Result<usize> {
        let port = self.passive().await?;
        // The data connection goes to the control connection's address, as
        // RFC 2428 says for EPSV and as curl does for PASV (its address is
        // the server's view, not the client's).
        let data = step("data connect", async {
            TcpStream::connect((self.peer, port))
                .await
                .context("data connect")
        })
        .await?;
        let (code, text) = self.command("LIST").await?;
        if code != 150 && code != 125 {
            bail!("LIST: {text}");
        }
        let mut data = data;
        let bytes = step("listing", async {
            let mut buf = vec![0u8; 16 * 1024];
            let mut total = 0usize;
            loop {
                let n = data.read(&mut buf).await.context("read listing")?;
                if n == 0 {
                    return Ok(total);
                }
                total += n;
                if total > MAX_LISTING {
                    bail!("listing longer than {MAX_LISTING} bytes");
                }
            }
        })
        .await?;
        drop(data);
        let (code, text) = self.reply().await?;
        if code != 226 && code != 250 {
            bail!("LIST end: {text}");
        }
        Ok(bytes)
    }

    /// QUIT, and close on the 221 (as curl does).
    async fn quit(mut self) -> Result<()> {
        self.expect("QUIT", &[221]).await?;
        Ok(())
    }
}

/// The port of a `227 Entering Passive Mode (h1,h2,h3,h4,p1,p2)` reply.
pub fn parse_pasv_port(text: &str) -> Option<u16> {
    let open = text.find('(')?;
    let inner = text.get(open + 1..)?;
    let inner = inner.get(..inner.find(')')?)?;
    let numbers: Vec<u16> = inner
        .split(',')
        .map(|n| n.trim().parse::<u16>().ok().filter(|n| *n < 256))
        .collect::<Option<Vec<_>>>()?;
    match numbers.as_slice() {
        [_, _, _, _, p1, p2] => Some(p1 * 256 + p2),
        _ => None,
    }
}

/// The port of a `229 Entering Extended Passive Mode (|||port|)` reply.
pub fn parse_epsv(text: &str) -> Option<u16> {
    let open = text.find('(')?;
    let inner = text.get(open + 1..)?;
    let close = inner.find(')')?;
    let inner = inner.get(..close)?;
    let delim = inner.chars().next()?;
    let fields: Vec<&str> = inner.split(delim).collect();
    match fields.as_slice() {
        ["", "", "", port, ""] => port.parse().ok(),
        _ => None,
    }
}

async fn one_session(addr: SocketAddr, list: bool) -> Result<()> {
    let mut c = Control::login(addr).await?;
    c.expect("PWD", &[257]).await?;
    if list {
        c.list().await?;
    }
    c.quit().await
}

/// The outcome of a rate run.
#[derive(Debug, Default)]
struct RateResult {
    ok: u64,
    failed: u64,
    secs: f64,
    first_error: Option<String>,
}

async fn rate(addr: SocketAddr, concurrency: usize, secs: f64, list: bool) -> RateResult {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        workers.spawn(async move {
            let mut r = RateResult::default();
            while Instant::now() < deadline {
                match one_session(addr, list).await {
                    Ok(()) => r.ok += 1,
                    Err(e) => {
                        r.failed += 1;
                        r.first_error.get_or_insert_with(|| format!("{e:#}"));
                        // A failing path must not turn into a busy loop.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            r
        });
    }
    let mut total = RateResult::default();
    while let Some(r) = workers.join_next().await {
        if let Ok(r) = r {
            total.ok += r.ok;
            total.failed += r.failed;
            if total.first_error.is_none() {
                total.first_error = r.first_error;
            }
        }
    }
    total.secs = start.elapsed().as_secs_f64();
    total
}

/// What each slow download must receive.
#[derive(Debug, Clone)]
struct Expected {
    path: String,
    size: u64,
    digest: u64,
    rate: u64,
}

/// The outcome of the slow downloads.
#[derive(Debug, Default)]
struct SlowResult {
    ok: usize,
    failed: usize,
    mismatched: usize,
    secs: f64,
    median_secs: f64,
    longest_secs: f64,
    first_error: Option<String>,
}

/// Bytes asked of the data socket per read (curl's --limit-rate reads
/// with its 16 KiB buffer; twice that halves the client's wakeups).
const SLOW_READ: usize = 32 * 1024;

/// One download: login, `TYPE I`, `EPSV` (or `PASV`), `RETR`; the permit
/// is held until the transfer started, so that at most `in_flight` logins
/// and data setups are in progress. Returns (bytes, digest, seconds of
/// the data phase).
async fn slow_one(
    addr: SocketAddr,
    want: &Expected,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<(u64, u64, f64)> {
    let mut c = Control::login(addr).await?;
    c.expect("TYPE I", &[200]).await?;
    let port = c.passive().await?;
    let mut data = step("data connect", async {
        TcpStream::connect((c.peer, port))
            .await
            .context("data connect")
    })
    .await?;
    let (code, text) = c.command(&format!("RETR {}", want.path)).await?;
    if code != 150 && code != 125 {
        bail!("RETR: {text}");
    }
    drop(permit);
    let start = Instant::now();
    let mut digest = Digest::default();
    let mut total = 0u64;
    let mut buf = vec![0u8; SLOW_READ];
    loop {
        let n = step("slow read", async {
            data.read(&mut buf).await.context("read data")
        })
        .await?;
        if n == 0 {
            break;
        }
        digest.update(buf.get(..n).unwrap_or_default());
        total += n as u64;
        if total > want.size {
            bail!("more than the {} bytes of the file", want.size);
        }
        // As curl --limit-rate: after a read that got ahead, wait until
        // the average is back at the rate.
        let due = start + Duration::from_secs_f64(total as f64 / want.rate as f64);
        tokio::time::sleep_until(due.into()).await;
    }
    let secs = start.elapsed().as_secs_f64();
    drop(data);
    let (code, text) = c.reply().await?;
    if code != 226 && code != 250 {
        bail!("RETR end: {text}");
    }
    c.quit().await?;
    Ok((total, digest.finish(), secs))
}

async fn slow(
    addr: SocketAddr,
    count: usize,
    in_flight: usize,
    want: Expected,
    secs: u64,
) -> SlowResult {
    let start = Instant::now();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let want = std::sync::Arc::new(want);
    let mut downloads = tokio::task::JoinSet::new();
    for _ in 0..count {
        let semaphore = std::sync::Arc::clone(&semaphore);
        let want = std::sync::Arc::clone(&want);
        downloads.spawn(async move {
            let permit = semaphore
                .acquire_owned()
                .await
                .context("the semaphore closed")?;
            slow_one(addr, &want, permit).await
        });
    }
    let mut r = SlowResult::default();
    let mut times = Vec::with_capacity(count);
    let all = async {
        while let Some(done) = downloads.join_next().await {
            match done {
                Ok(Ok((bytes, digest, t))) if bytes == want.size && digest == want.digest => {
                    r.ok += 1;
                    times.push(t);
                }
                Ok(Ok((bytes, _, _))) => {
                    r.mismatched += 1;
                    r.first_error.get_or_insert_with(|| {
                        format!("got {bytes} bytes of {}, or other bytes", want.size)
                    });
                }
                Ok(Err(e)) => {
                    r.failed += 1;
                    r.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
                Err(e) => {
                    r.failed += 1;
                    r.first_error.get_or_insert_with(|| format!("{e}"));
                }
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(secs), all)
        .await
        .is_err()
    {
        downloads.abort_all();
        r.first_error
            .get_or_insert_with(|| format!("not all done after {secs} s"));
    }
    r.failed = count.saturating_sub(r.ok + r.mismatched);
    times.sort_by(f64::total_cmp);
    r.median_secs = times.get(times.len() / 2).copied().unwrap_or(0.0);
    r.longest_secs = times.last().copied().unwrap_or(0.0);
    r.secs = start.elapsed().as_secs_f64();
    r
}

async fn idle(
    addr: SocketAddr,
    count: usize,
    in_flight: usize,
    open_secs: u64,
    hold_secs: u64,
) -> Result<()> {
    let start = Instant::now();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..count {
        let permit = std::sync::Arc::clone(&semaphore);
        opening.spawn(async move {
            let _permit = permit.acquire_owned().await;
            Control::login(addr).await
        });
    }
    let mut open = Vec::with_capacity(count);
    let mut failed = 0usize;
    let mut first_error: Option<String> = None;
    let all = async {
        while let Some(r) = opening.join_next().await {
            match r {
                Ok(Ok(c)) => open.push(c),
                Ok(Err(e)) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("{e:#}"));
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert_with(|| format!("{e}"));
                }
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(open_secs), all)
        .await
        .is_err()
    {
        opening.abort_all();
        first_error.get_or_insert_with(|| format!("not all open after {open_secs} s"));
    }
    let failed = count.saturating_sub(open.len()).max(failed);
    println!(
        "idle ok={} failed={} secs={:.3} first_error={}",
        open.len(),
        failed,
        start.elapsed().as_secs_f64(),
        first_error.as_deref().unwrap_or("-").replace(' ', "_")
    );
    // Hold until the harness says so (a line or end of file on stdin).
    let waiter = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    });
    let _ = tokio::time::timeout(Duration::from_secs(hold_secs), waiter).await;
    drop(open);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Digest, parse_epsv, parse_pasv_port};

    #[test]
    fn digest_ignores_read_sizes() {
        let data: Vec<u8> = (0..10_007u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let mut whole = Digest::default();
        whole.update(&data);
        let whole = whole.finish();
        for step in [1, 3, 8, 13, 4096] {
            let mut d = Digest::default();
            for chunk in data.chunks(step) {
                d.update(chunk);
            }
            assert_eq!(d.finish(), whole, "reads of {step}");
        }
        // A lost byte, a changed byte, a trailing zero: all differ.
        let digest = |b: &[u8]| {
            let mut d = Digest::default();
            d.update(b);
            d.finish()
        };
        assert_ne!(digest(&data[1..]), whole);
        let mut changed = data.clone();
        changed[5000] ^= 1;
        assert_ne!(digest(&changed), whole);
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(digest(&longer), whole);
        assert_ne!(digest(b""), digest(b"\0"));
    }

    #[test]
    fn pasv_replies() {
        assert_eq!(
            parse_pasv_port("227 Entering Passive Mode (127,0,0,1,117,48)."),
            Some(117 * 256 + 48)
        );
        assert_eq!(parse_pasv_port("227 (127,0,0,1,256,1)"), None);
        assert_eq!(parse_pasv_port("227 (127,0,0,1,1)"), None);
    }

    #[test]
    fn epsv_replies() {
        assert_eq!(
            parse_epsv("229 Entering Extended Passive Mode (|||30001|)"),
            Some(30001)
        );
        assert_eq!(
            parse_epsv("229 Entering Extended Passive Mode (!!!2!)"),
            Some(2)
        );
        assert_eq!(parse_epsv("229 (|||x|)"), None);
        assert_eq!(parse_epsv("229 no parenthesis"), None);
        assert_eq!(parse_epsv("229 (||1|2|)"), None);
    }
}
