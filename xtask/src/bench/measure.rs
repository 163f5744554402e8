//! Measurements: CPU time and memory of process trees from /proc, the
//! transfers (curl, the same client for every path), and the statistics
//! (median, min, max) over repetitions.
//!
//! CPU is read as utime + stime + cutime + cstime of every process of a
//! tree: a forking server's sessions that ended were reaped by their parent
//! and their time moved into its cutime/cstime, so the sum over the tree
//! stays exact as long as the tree is read when no session is exiting (the
//! harness waits for the tree to settle first).
//!
//! On the wire a good part of the work is forwarding and softirq, charged
//! to nobody's process, so CPU is also read for the whole machine from
//! /proc/stat ([`machine_busy_ticks`]), with the CPU that other jobs'
//! processes used in the same interval beside it ([`OtherJobs`]), since
//! the machine is shared. Memory there is the machine's
//! (MemTotal − MemAvailable), beside other jobs' ([`other_rss_kib`]), and
//! the bytes queued in each host's TCP sockets (`ss -tm`).

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Clock ticks per second (`getconf CLK_TCK`).
pub fn clock_ticks() -> Result<f64> {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("running getconf CLK_TCK")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ticks: f64 = text
        .trim()
        .parse()
        .with_context(|| format!("getconf CLK_TCK said {text:?}"))?;
    if ticks <= 0.0 {
        bail!("getconf CLK_TCK said {ticks}");
    }
    Ok(ticks)
}

/// The fields of /proc/PID/stat the harness uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Parent process id.
    pub ppid: u32,
    /// utime + stime + cutime + cstime, in clock ticks.
    pub ticks: u64,
}

/// Parses /proc/PID/stat: the command name is in parentheses and may hold
/// spaces or parentheses itself, so the fields are counted after the last
/// `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    Some(Stat {
        ppid: u32::try_from(field(4)?).ok()?,
        ticks: field(14)? + field(15)? + field(16)? + field(17)?,
    })
}

fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every process id on the machine with its parent.
fn all_parents() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = read_stat(pid) {
            map.insert(pid, stat.ppid);
        }
    }
    map
}

/// `root` and all its descendants that are alive (zombies included).
pub fn tree(root: u32) -> Vec<u32> {
    let parents = all_parents();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&pid, &ppid) in &parents {
        children.entry(ppid).or_default().push(pid);
    }
    let mut out = Vec::new();
    if !parents.contains_key(&root) {
        return out;
    }
    let mut stack = vec![root];
    // Bounded: each pid is visited once.
    while let Some(pid) = stack.pop() {
        if out.len() > parents.len() {
            break;
        }
        out.push(pid);
        if let Some(kids) = children.get(&pid) {
            stack.extend(kids.iter().copied());
        }
    }
    out
}

/// CPU ticks of a tree (see the module documentation).
pub fn tree_ticks(root: u32) -> u64 {
    tree(root)
        .into_iter()
        .filter_map(read_stat)
        .map(|s| s.ticks)
        .sum()
}

/// CPU ticks of this process's reaped children (the curl runs).
pub fn children_ticks() -> u64 {
    let Some(text) = std::fs::read_to_string("/proc/self/stat").ok() else {
        return 0;
    };
    let Some(rest) = text.rfind(')').and_then(|i| text.get(i + 1..)) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(16) + field(17)
}

/// Waits until the tree of `root` has at most `baseline` processes (the
/// sessions of a forking daemon have exited and were reaped), at most
/// `limit`. Returns whether it settled.
pub fn settle(root: u32, baseline: usize, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if tree(root).len() <= baseline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Resident and proportional set size of a tree, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Sum of Rss (shared pages counted once per process).
    pub rss_kib: u64,
    /// Sum of Pss (shared pages divided among their users).
    pub pss_kib: u64,
    /// Processes in the tree.
    pub processes: usize,
}

/// Parses the `Rss:` and `Pss:` lines of /proc/PID/smaps_rollup.
pub fn parse_rollup(text: &str) -> (u64, u64) {
    let mut rss = 0;
    let mut pss = 0;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let key = words.next();
        let value = words.next().and_then(|v| v.parse::<u64>().ok());
        match (key, value) {
            (Some("Rss:"), Some(v)) => rss = v,
            (Some("Pss:"), Some(v)) => pss = v,
            _ => {}
        }
    }
    (rss, pss)
}

/// Memory of the tree of `root`.
pub fn tree_memory(root: u32) -> Memory {
    let pids = tree(root);
    let mut m = Memory {
        processes: pids.len(),
        ..Memory::default()
    };
    for pid in pids {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            let (rss, pss) = parse_rollup(&text);
            m.rss_kib += rss;
            m.pss_kib += pss;
        }
    }
    m
}

/// Threads on the machine (they take process ids too).
pub fn tasks_on_machine() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|s| s.parse::<u32>().is_ok())
        })
        .map(|e| {
            std::fs::read_dir(e.path().join("task"))
                .map(|t| t.count())
                .unwrap_or(1)
        })
        .sum()
}

/// A line of /proc/meminfo in KiB.
pub fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(key) && l.as_bytes().get(key.len()) == Some(&b':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Busy clock ticks of all CPUs since boot, from the first line of
/// /proc/stat: user + nice + system + irq + softirq (guest time is inside
/// user and nice already; idle, iowait and steal are not work done here).
pub fn machine_busy_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_proc_stat(&s))
        .unwrap_or(0)
}

/// The busy ticks of the `cpu ` line of /proc/stat.
pub fn parse_proc_stat(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<Vec<_>>>()?;
    // user nice system idle iowait irq softirq steal guest guest_nice
    Some(f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)?)
}

/// The network namespace inode of a process (`/proc/PID/ns/net`).
fn net_ns(pid: u32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let link = link.to_string_lossy();
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// CPU ticks of the processes of other jobs on the machine: user-space
/// processes outside the run's network namespaces, other than the harness
/// itself and its children (kernel threads count as the run's: they do its
/// softirq work). A snapshot; [`OtherJobs::since`] gives the difference.
/// Processes that start and end between two snapshots are seen through
/// their parent's cutime/cstime once reaped.
#[derive(Debug, Default)]
pub struct OtherJobs {
    ticks: HashMap<u32, u64>,
}

impl OtherJobs {
    /// Reads every process; `ours` are the run's namespace inodes (empty
    /// on loopback, where only the harness's own tree is excluded).
    pub fn snapshot(ours: &[u64]) -> OtherJobs {
        // The harness's tree holds its daemons and clients, and on loopback
        // the sessions of forking daemons.
        let excluded: std::collections::HashSet<u32> =
            tree(std::process::id()).into_iter().collect();
        let mut ticks = HashMap::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return OtherJobs { ticks };
        };
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if excluded.contains(&pid) {
                continue;
            }
            let Some(stat) = read_stat(pid) else {
                continue;
            };
            if pid == 2 || stat.ppid == 2 {
                continue;
            }
            if net_ns(pid).is_some_and(|ns| ours.contains(&ns)) {
                continue;
            }
            ticks.insert(pid, stat.ticks);
        }
        OtherJobs { ticks }
    }

    /// Ticks the other jobs used between `before` and this snapshot. A
    /// process that ended in between was reaped by its parent, whose
    /// cutime/cstime now holds all its ticks, also those from before
    /// `before`: what it had then is taken off again.
    pub fn since(&self, before: &OtherJobs) -> u64 {
        let mut total: i128 = 0;
        for (pid, t) in &self.ticks {
            total += i128::from(*t) - i128::from(before.ticks.get(pid).copied().unwrap_or(0));
        }
        for (pid, t) in &before.ticks {
            if !self.ticks.contains_key(pid) {
                total -= i128::from(*t);
            }
        }
        u64::try_from(total.max(0)).unwrap_or(0)
    }
}

/// Anonymous resident memory of other jobs' processes, KiB: every process outside
/// the run's namespaces `ours` but the harness itself (kernel threads hold
/// none). With [`machine_used_kib`] it tells the run's memory from what a
/// compile next door allocated meanwhile.
pub fn other_rss_kib(ours: &[u64]) -> u64 {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut kib = 0;
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || net_ns(pid).is_some_and(|ns| ours.contains(&ns)) {
            continue;
        }
        // statm: size resident shared ..., in pages. Resident minus
        // shared (file-backed) is the anonymous memory that
        // MemAvailable cannot count as available.
        let anon = std::fs::read_to_string(format!("/proc/{pid}/statm"))
            .ok()
            .and_then(|s| {
                let f: Vec<u64> = s
                    .split_whitespace()
                    .take(3)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                Some(f.get(1)?.saturating_sub(*f.get(2)?))
            })
            .unwrap_or(0);
        kib += anon * 4;
    }
    kib
}

/// Memory in use on the machine, KiB: MemTotal − MemAvailable.
pub fn machine_used_kib() -> u64 {
    match (meminfo_kib("MemTotal"), meminfo_kib("MemAvailable")) {
        (Some(t), Some(a)) => t.saturating_sub(a),
        _ => 0,
    }
}

/// Bytes queued in the TCP sockets `ss -tmnH` lists (run it in a
/// namespace to read that host's): per socket, the receive queue's memory
/// (`r`, rmem_alloc) and the send queue's (`w`, wmem_queued), summed.
/// Unlike /proc/net/sockstat's global count, other jobs' sockets are not
/// in it.
pub fn parse_ss_queued(text: &str) -> u64 {
    let mut total = 0;
    for part in text.split("skmem:(").skip(1) {
        let Some(fields) = part.split(')').next() else {
            continue;
        };
        for f in fields.split(',') {
            let value = f
                .strip_prefix('r')
                .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))
                .or_else(|| f.strip_prefix('w'));
            if let Some(v) = value.and_then(|v| v.parse::<u64>().ok()) {
                total += v;
            }
        }
    }
    total
}

/// A sysctl read from /proc/sys.
pub fn sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(path))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Median, min and max of a set of repetitions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
    /// How many values.
    pub n: usize,
}

/// Summarises `values`; `None` when there are none.
pub fn summary(values: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

/// One transfer's result.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transfer {
    /// Bytes moved.
    pub bytes: u64,
    /// Seconds of the data phase (curl's total minus pre-transfer).
    pub secs: f64,
    /// CPU seconds of the client (curl).
    pub client_cpu: f64,
    /// CPU seconds of the proxy's process tree (0 for direct).
    pub proxy_cpu: f64,
    /// CPU seconds of the server's process tree.
    pub server_cpu: f64,
    /// Busy CPU seconds of the whole machine during the transfer
    /// ([`machine_busy_ticks`]).
    pub machine_cpu: f64,
    /// Of which other jobs' processes ([`OtherJobs`]).
    pub other_cpu: f64,
}

impl Transfer {
    /// MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }

    /// CPU seconds per GB (10^9 bytes) of the proxy.
    pub fn proxy_per_gb(&self) -> f64 {
        self.proxy_cpu / (self.bytes as f64 / 1e9)
    }

    /// CPU seconds per GB summed over client, proxy and server.
    pub fn total_per_gb(&self) -> f64 {
        (self.client_cpu + self.proxy_cpu + self.server_cpu) / (self.bytes as f64 / 1e9)
    }

    /// The machine's busy CPU seconds per GB.
    pub fn machine_per_gb(&self) -> f64 {
        self.machine_cpu / (self.bytes as f64 / 1e9)
    }

    /// Other jobs' CPU seconds per GB in the same interval.
    pub fn other_per_gb(&self) -> f64 {
        self.other_cpu / (self.bytes as f64 / 1e9)
    }
}

/// Parses curl's `-w '%{size_download} %{size_upload} %{time_total} %{time_pretransfer}'`.
pub fn parse_curl_w(text: &str) -> Option<(u64, f64)> {
    let f: Vec<&str> = text.split_whitespace().collect();
    let down: f64 = f.first()?.parse().ok()?;
    let up: f64 = f.get(1)?.parse().ok()?;
    let total: f64 = f.get(2)?.parse().ok()?;
    let pre: f64 = f.get(3)?.parse().ok()?;
    let bytes = down.max(up) as u64;
    let secs = total - pre;
    (secs > 0.0).then_some((bytes, secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_names() {
        let line =
            "1234 (a) b (c)) S 77 1234 1234 0 -1 4194560 100 0 0 0 150 25 3 4 20 0 1 0 100 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                ppid: 77,
                ticks: 150 + 25 + 3 + 4
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn rollup() {
        let text = "55d0-7ff [rollup]\nRss:                2048 kB\nPss:                1024 kB\nPss_Anon:  12 kB\n";
        assert_eq!(parse_rollup(text), (2048, 1024));
    }

    #[test]
    fn summaries() {
        let s = summary(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(summary(&[4.0, 1.0]).unwrap().median, 2.5);
        assert!(summary(&[]).is_none());
        assert!(summary(&[f64::NAN]).is_none());
    }

    #[test]
    fn curl_write_out() {
        assert_eq!(
            parse_curl_w("1073741824 0 1.5 0.5"),
            Some((1073741824, 1.0))
        );
        assert_eq!(
            parse_curl_w("0 67108864 0.3 0.1").map(|r| r.0),
            Some(67108864)
        );
        assert_eq!(parse_curl_w("1 0 0.1 0.1"), None);
        assert_eq!(parse_curl_w(""), None);
    }

    #[test]
    fn machine_counters() {
        let stat = "cpu  100 20 30 400 5 6 7 8 9 10\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_proc_stat(stat), Some(100 + 20 + 30 + 6 + 7));
        assert_eq!(parse_proc_stat("cpu0 1 2\n"), None);
        assert!(machine_busy_ticks() > 0);
        let ss = "ESTAB 0 0 10.201.1.1:12000 10.201.1.2:40000\n\t \
                  skmem:(r4096,rb131072,t0,tb46080,f0,w81920,o0,bl0,d0)\n\
                  ESTAB 0 0 10.201.2.1:5000 10.201.2.2:12001\n\t \
                  skmem:(r100,rb6291456,t0,tb87040,f4000,w0,o0,bl0,d2)\n";
        assert_eq!(parse_ss_queued(ss), 4096 + 81920 + 100);
        assert_eq!(parse_ss_queued(""), 0);
        assert!(other_rss_kib(&[]) > 0);
        assert!(machine_used_kib() > 0);
        let a = OtherJobs::snapshot(&[]);
        assert!(!a.ticks.contains_key(&std::process::id()));
        // A child that ran before the first snapshot and was reaped
        // before the second: its parent's cutime grows by all of it.
        let before = OtherJobs {
            ticks: HashMap::from([(10, 100), (11, 50)]),
        };
        let after = OtherJobs {
            ticks: HashMap::from([(10, 100 + 50 + 3), (12, 4)]),
        };
        assert_eq!(after.since(&before), 3 + 4);
    }

    #[test]
    fn own_tree_contains_self() {
        let me = std::process::id();
        assert!(tree(me).contains(&me));
        assert!(tree_memory(me).rss_kib > 0);
    }
}
