//! Running make with its output kept in a log and progress printed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{PROGRESS_EVERY, PROGRESS_EVERY_OBJECTS, TAIL_LINES};
use crate::{Error, Result};

// ---------------------------------------------------------------------------
// Running make with a log and progress

/// The build log: every command's output goes here in full.
pub(super) struct Log {
    path: PathBuf,
    file: File,
}

impl Log {
    pub(super) fn create(path: &Path) -> Result<Self> {
        let file =
            File::create(path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn write_line(&mut self, line: &str) -> Result<()> {
        writeln!(self.file, "{line}")
            .map_err(|e| Error::io(format!("writing {}", self.path.display()), e))
    }

    /// Runs `cmd`, logging its stdout and stderr; with `progress`, prints a
    /// compact progress line now and then. On failure, the error carries the
    /// last lines of output and the log's path.
    pub(super) fn run(&mut self, cmd: &mut Command, what: &str, progress: bool) -> Result<()> {
        self.write_line(&format!("==> {what}: {cmd:?}"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting {what}"), e))?;
        let (tx, rx) = mpsc::channel::<String>();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(spawn_reader(out, tx.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(spawn_reader(err, tx.clone()));
        }
        drop(tx);

        let mut tail = VecDeque::with_capacity(TAIL_LINES);
        let mut meter = Progress::new(Instant::now());
        let mut log_error = None;
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(line) => {
                    if log_error.is_none() {
                        log_error = self.write_line(&line).err();
                    }
                    if progress && let Some(msg) = meter.line(&line, Instant::now()) {
                        eprintln!("kernel:   {what}: {msg}");
                    }
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if progress && let Some(msg) = meter.tick(Instant::now()) {
                        eprintln!("kernel:   {what}: {msg}");
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        for reader in readers {
            // A reader thread cannot panic short of a bug; its loss only loses output.
            let _ = reader.join();
        }
        let status = child
            .wait()
            .map_err(|e| Error::io(format!("waiting for {what}"), e))?;
        if let Some(e) = log_error {
            return Err(e);
        }
        self.write_line(&format!("==> {what}: {status}"))?;
        if progress && status.success() {
            eprintln!("kernel:   {what}: {}", meter.summary(Instant::now()));
        }
        if status.success() {
            return Ok(());
        }
        let tail: Vec<String> = tail.into_iter().collect();
        Err(Error::Command {
            what: what.to_owned(),
            status: status.to_string(),
            tail: format!(
                ":\n{}\n(full log: {})",
                tail.join("\n"),
                self.path.display()
            ),
        })
    }
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    tx: mpsc::Sender<String>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    if tx
                        .send(line.trim_end_matches(['\n', '\r']).to_owned())
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    })
}

/// Counts the objects kbuild reports (`  CC      path`, `  LD ...`) and decides
/// when to print a progress line.
struct Progress {
    start: Instant,
    last_print: Instant,
    objects: u64,
    printed_at: u64,
    last_object: String,
}

impl Progress {
    fn new(now: Instant) -> Self {
        Self {
            start: now,
            last_print: now,
            objects: 0,
            printed_at: 0,
            last_object: String::new(),
        }
    }

    /// Feeds one output line; returns a progress message when one is due.
    fn line(&mut self, line: &str, now: Instant) -> Option<String> {
        if let Some(object) = object_line(line) {
            self.objects += 1;
            self.last_object = object.to_owned();
            if self.objects - self.printed_at >= PROGRESS_EVERY_OBJECTS {
                return Some(self.report(now));
            }
        }
        self.tick(now)
    }

    /// Returns a progress message if none was printed for [`PROGRESS_EVERY`].
    fn tick(&mut self, now: Instant) -> Option<String> {
        (now.duration_since(self.last_print) >= PROGRESS_EVERY).then(|| self.report(now))
    }

    fn report(&mut self, now: Instant) -> String {
        self.last_print = now;
        self.printed_at = self.objects;
        format!(
            "{} objects, {} elapsed (last: {})",
            self.objects,
            fmt_duration(now.duration_since(self.start)),
            self.last_object
        )
    }

    fn summary(&self, now: Instant) -> String {
        format!(
            "done: {} objects in {}",
            self.objects,
            fmt_duration(now.duration_since(self.start))
        )
    }
}

/// For a kbuild quiet-mode line that builds an object (`CC`, `AS`, `LD`, `AR`,
/// and their `HOST` variants), the object's path.
fn object_line(line: &str) -> Option<&str> {
    if !line.starts_with(' ') {
        return None;
    }
    let mut words = line.split_whitespace();
    let tag = words.next()?;
    let tag = tag.strip_prefix("HOST").unwrap_or(tag);
    if !matches!(tag, "CC" | "AS" | "LD" | "AR") {
        return None;
    }
    let next = words.next()?;
    // Module builds print `CC [M]  path`.
    if next == "[M]" {
        words.next()
    } else {
        Some(next)
    }
}

pub(super) fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn logged_run_keeps_the_output_and_reports_the_tail() {
        let dir = std::env::temp_dir().join(format!("kernel-log-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log_path = dir.join("build.log");
        let mut log = Log::create(&log_path).unwrap();
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo '  CC      a.o'"]);
        log.run(&mut ok, "ok step", true).unwrap();
        let mut bad = Command::new("sh");
        bad.args(["-c", "echo out-line; echo err-line >&2; exit 3"]);
        match log.run(&mut bad, "bad step", false) {
            Err(Error::Command { what, tail, .. }) => {
                assert_eq!(what, "bad step");
                assert!(
                    tail.contains("out-line") && tail.contains("err-line"),
                    "{tail}"
                );
                assert!(tail.contains(&log_path.display().to_string()), "{tail}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let text = fs::read_to_string(&log_path).unwrap();
        assert!(
            text.contains("  CC      a.o")
                && text.contains("out-line")
                && text.contains("err-line")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
    #[test]
    fn object_lines_are_counted() {
        assert_eq!(object_line("  CC      init/main.o"), Some("init/main.o"));
        assert_eq!(
            object_line("  HOSTCC  scripts/basic/fixdep"),
            Some("scripts/basic/fixdep")
        );
        assert_eq!(object_line("  AR      lib/lib.a"), Some("lib/lib.a"));
        assert_eq!(object_line("  CC [M]  drivers/x.o"), Some("drivers/x.o"));
        assert_eq!(object_line("  GEN     Makefile"), None);
        assert_eq!(object_line("CC init/main.o"), None);
        assert_eq!(object_line("make[1]: Entering directory"), None);
    }

    #[test]
    fn progress_prints_every_500_objects_or_30s() {
        let t0 = Instant::now();
        let mut p = Progress::new(t0);
        for i in 1..PROGRESS_EVERY_OBJECTS {
            assert_eq!(p.line(&format!("  CC      f{i}.o"), t0), None);
        }
        let msg = p.line("  CC      last.o", t0).unwrap();
        assert!(
            msg.starts_with("500 objects") && msg.contains("last.o"),
            "{msg}"
        );
        assert_eq!(p.tick(t0 + Duration::from_secs(29)), None);
        assert!(
            p.tick(t0 + Duration::from_secs(31))
                .unwrap()
                .contains("31s elapsed")
        );
        assert_eq!(fmt_duration(Duration::from_secs(754)), "12m34s");
    }
}
