//! An FTP server written for the tests, in process, on 127.0.0.1:0: the
//! unprivileged tier's stand-in for vsftpd. It speaks enough of RFC 959
//! for real sessions (login, PWD, CWD, TYPE, FEAT, STAT, PASV, EPSV, PORT,
//! EPRT, LIST, RETR, STOR, ABOR, QUIT), handles one command at a time like
//! vsftpd (commands sent during a transfer wait for its end, except ABOR
//! and, when asked, STAT), and misbehaves on request ([`Behavior`]) so the
//! gateway's handling of late, missing or extra replies can be tested.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How the fake server departs from the norm.
#[derive(Debug, Clone, Default)]
pub struct Behavior {
    /// RETR/LIST/STOR: after 150, never open the data connection, and send
    /// this final reply after this delay.
    pub stall_after_150: Option<(Duration, u16)>,
    /// ABOR during a transfer gets one reply (226) instead of 426 then 226.
    pub abor_one_reply: bool,
    /// Pause between 64 KiB chunks of a download (keeps transfers running).
    pub chunk_delay: Option<Duration>,
    /// STAT during a transfer is answered at once (213), as RFC 959 allows.
    pub stat_during_transfer: bool,
    /// Send 226 before the last bytes of a download leave (the reply
    /// overtakes the data; the gateway must hold it).
    pub early_226: bool,
    /// Greet with this line (e.g. `421 Too many users`) instead of 220,
    /// then close.
    pub refuse_with: Option<&'static str>,
    /// Expect a PROXY v1 header line first, recorded in `received`.
    pub proxy_v1: bool,
}

/// A running fake server; stopped on drop.
pub struct FakeServer {
    pub addr: SocketAddr,
    pub files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    /// Every command line received, in order, over all sessions.
    pub received: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeServer {
    pub async fn start(behavior: Behavior) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let files = Arc::new(Mutex::new(HashMap::new()));
        let received = Arc::new(Mutex::new(Vec::new()));
        let behavior = Arc::new(behavior);
        let task = {
            let files = Arc::clone(&files);
            let received = Arc::clone(&received);
            tokio::spawn(async move {
                let mut sessions = tokio::task::JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    sessions.spawn(serve(
                        stream,
                        Arc::clone(&files),
                        Arc::clone(&received),
                        Arc::clone(&behavior),
                    ));
                }
            })
        };
        FakeServer {
            addr,
            files,
            received,
            task,
        }
    }

    pub fn put(&self, name: &str, content: &[u8]) {
        self.files
            .lock()
            .unwrap()
            .insert(name.to_owned(), content.to_vec());
    }

    pub fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.files.lock().unwrap().get(name).cloned()
    }

    pub fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

enum DataPlan {
    None,
    Passive(TcpListener),
    Active(SocketAddr),
}

async fn open_data(plan: DataPlan) -> std::io::Result<TcpStream> {
    match plan {
        DataPlan::Passive(listener) => Ok(listener.accept().await?.0),
        DataPlan::Active(target) => TcpStream::connect(target).await,
        DataPlan::None => Err(std::io::ErrorKind::NotConnected.into()),
    }
}

/// What a transfer task reports at its end: the final reply.
type TransferTask = JoinHandle<&'static str>;

async fn write(tx: &mut OwnedWriteHalf, text: &str) {
    let _ = tx.write_all(text.as_bytes()).await;
}

fn parse_port(arg: &str) -> Option<SocketAddr> {
    let n: Vec<u16> = arg
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    if n.len() != 6 {
        return None;
    }
    let ip = std::net::Ipv4Addr::new(n[0] as u8, n[1] as u8, n[2] as u8, n[3] as u8);
    Some(SocketAddr::new(ip.into(), n[4] * 256 + n[5]))
}

fn parse_eprt(arg: &str) -> Option<SocketAddr> {
    let parts: Vec<&str> = arg.split('|').collect();
    if parts.len() < 5 {
        return None;
    }
    Some(SocketAddr::new(
        parts[2].parse().ok()?,
        parts[3].parse().ok()?,
    ))
}

/// Reads one line (with its end), cancel-safe: what is read stays in
/// `buf`. Reads with `try_read` until the kernel says it would block, so a
/// read cut short at an urgent mark does not stall (see the gateway's
/// `session::control`).
async fn read_line(rx: &tokio::net::tcp::OwnedReadHalf, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            return Some(buf.drain(..=end).collect());
        }
        rx.readable().await.ok()?;
        let mut chunk = [0u8; 4096];
        match rx.try_read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return None,
        }
    }
}

async fn serve(
    stream: TcpStream,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    received: Arc<Mutex<Vec<String>>>,
    behavior: Arc<Behavior>,
) {
    // As vsftpd: urgent data (the Synch before ABOR) stays in the stream.
    let _ = socket2::SockRef::from(&stream).set_out_of_band_inline(true);
    let (rx, mut tx) = stream.into_split();
    // Kept across iterations: a read cancelled by the end of a transfer
    // leaves what it read here.
    let mut buf = Vec::new();
    if behavior.proxy_v1 {
        let Some(header) = read_line(&rx, &mut buf).await else {
            return;
        };
        let header = String::from_utf8_lossy(&header).trim_end().to_owned();
        received.lock().unwrap().push(header);
    }
    if let Some(refusal) = behavior.refuse_with {
        write(&mut tx, &format!("{refusal}\r\n")).await;
        return;
    }
    write(&mut tx, "220 fake FTP server ready\r\n").await;
    let mut logged_in = false;
    let mut user = false;
    let mut data = DataPlan::None;
    let mut transfer: Option<TransferTask> = None;
    let mut waiting: VecDeque<String> = VecDeque::new();
    loop {
        // The next command: one that waited for a transfer, or a new line.
        let line = if transfer.is_none() && !waiting.is_empty() {
            waiting.pop_front().unwrap()
        } else {
            let read = read_line(&rx, &mut buf);
            let line = match transfer.as_mut() {
                // The control connection first, as vsftpd's SIGURG handler
                // sees ABOR before the broken data connection.
                Some(task) => tokio::select! {
                    biased;
                    got = read => match got { Some(line) => line, None => return },
                    done = task => {
                        transfer = None;
                        write(&mut tx, done.unwrap_or("451 transfer task failed\r\n")).await;
                        continue;
                    }
                },
                None => match read.await {
                    Some(line) => line,
                    None => return,
                },
            };
            // Telnet IP/DM and IAC bytes before ABOR are not part of the verb.
            let text: String = String::from_utf8_lossy(&line)
                .trim_start_matches(['\u{fffd}'])
                .trim_end()
                .to_owned();
            received.lock().unwrap().push(text.clone());
            text
        };
        let (verb, arg) = match line.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.to_owned()),
            None => (line.to_ascii_uppercase(), String::new()),
        };
        if let Some(task) = transfer.as_mut() {
            match verb.as_str() {
                "ABOR" => {
                    task.abort();
                    transfer = None;
                    if behavior.abor_one_reply {
                        write(&mut tx, "226 Abort successful\r\n").await;
                    } else {
                        write(&mut tx, "426 Transfer aborted\r\n226 Abort successful\r\n").await;
                    }
                }
                "STAT" if behavior.stat_during_transfer => {
                    write(&mut tx, "213 Transfer in progress\r\n").await;
                }
                _ => waiting.push_back(line),
            }
            continue;
        }
        let reply: String = match verb.as_str() {
            "USER" => {
                user = true;
                logged_in = false;
                "331 Password please\r\n".into()
            }
            "PASS" if user => {
                logged_in = true;
                "230 Logged in\r\n".into()
            }
            "PASS" => "503 Login with USER first\r\n".into(),
            "QUIT" if !arg.is_empty() => "501 QUIT takes no argument\r\n".into(),
            "QUIT" => {
                write(&mut tx, "221 Goodbye\r\n").await;
                return;
            }
            "NOOP" => "200 NOOP ok\r\n".into(),
            "SYST" => "215 UNIX Type: L8\r\n".into(),
            "FEAT" => "211-Features:\r\n EPSV\r\n EPRT\r\n PASV\r\n AUTH TLS\r\n211 End\r\n".into(),
            "STAT" => "211 fake FTP server status\r\n".into(),
            _ if !logged_in => "530 Please login with USER and PASS.\r\n".into(),
            "PWD" => "257 \"/\" is the current directory\r\n".into(),
            "CWD" => "250 Directory changed\r\n".into(),
            "TYPE" => "200 Type set\r\n".into(),
            "ABOR" => "225 No transfer to ABOR\r\n".into(),
            "PASV" => {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let port = listener.local_addr().unwrap().port();
                data = DataPlan::Passive(listener);
                format!(
                    "227 Entering Passive Mode (127,0,0,1,{},{})\r\n",
                    port / 256,
                    port % 256
                )
            }
            "EPSV" => {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                let port = listener.local_addr().unwrap().port();
                data = DataPlan::Passive(listener);
                format!("229 Entering Extended Passive Mode (|||{port}|)\r\n")
            }
            "PORT" | "EPRT" => {
                let target = if verb == "PORT" {
                    parse_port(&arg)
                } else {
                    parse_eprt(&arg)
                };
                match target {
                    Some(target) => {
                        data = DataPlan::Active(target);
                        "200 PORT command successful\r\n".into()
                    }
                    None => "501 Bad address\r\n".into(),
                }
            }
            "RETR" | "LIST" | "NLST" | "STOR" | "APPE" => {
                let content = match verb.as_str() {
                    "RETR" => files.lock().unwrap().get(&arg).cloned(),
                    "LIST" | "NLST" => {
                        let names: Vec<String> = files.lock().unwrap().keys().cloned().collect();
                        Some(names.join("\r\n").into_bytes())
                    }
                    _ => Some(Vec::new()),
                };
                let Some(content) = content else {
                    write(&mut tx, "550 No such file\r\n").await;
                    continue;
                };
                if matches!(data, DataPlan::None) {
                    write(&mut tx, "425 Use PORT or PASV first\r\n").await;
                    continue;
                }
                let plan = std::mem::replace(&mut data, DataPlan::None);
                write(&mut tx, "150 Opening data connection\r\n").await;
                if let Some((delay, code)) = behavior.stall_after_150 {
                    let reply: &'static str = match code {
                        425 => "425 Failed to establish connection\r\n",
                        _ => "226 Transfer complete\r\n",
                    };
                    transfer = Some(tokio::spawn(async move {
                        let _plan = plan;
                        tokio::time::sleep(delay).await;
                        reply
                    }));
                    continue;
                }
                let upload = verb == "STOR" || verb == "APPE";
                let files = Arc::clone(&files);
                let early_226 = behavior.early_226;
                let behavior = Arc::clone(&behavior);
                let name = arg.clone();
                transfer = Some(tokio::spawn(async move {
                    let Ok(mut stream) = open_data(plan).await else {
                        return "425 Can't open data connection\r\n";
                    };
                    if upload {
                        let mut got = Vec::new();
                        if stream.read_to_end(&mut got).await.is_err() {
                            return "426 Connection lost\r\n";
                        }
                        files.lock().unwrap().insert(name, got);
                        return "226 Transfer complete\r\n";
                    }
                    for chunk in content.chunks(64 * 1024) {
                        if stream.write_all(chunk).await.is_err() {
                            return "426 Connection lost\r\n";
                        }
                        if let Some(delay) = behavior.chunk_delay {
                            tokio::time::sleep(delay).await;
                        }
                    }
                    let _ = stream.shutdown().await;
                    // Wait for the peer's end (it closes after reading all).
                    let mut rest = [0u8; 16];
                    let _ = stream.read(&mut rest).await;
                    "226 Transfer complete\r\n"
                }));
                if early_226 {
                    // The final reply goes out before the data has been read.
                    if let Some(task) = transfer.take() {
                        write(&mut tx, "226 Transfer complete\r\n").await;
                        tokio::spawn(async move {
                            let _ = task.await;
                        });
                    }
                }
                continue;
            }
            _ => "502 Command not implemented\r\n".into(),
        };
        write(&mut tx, &reply).await;
    }
}
