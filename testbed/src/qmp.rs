//! A minimal QMP client (QEMU Machine Protocol, JSON over a Unix socket), for
//! hot-unplug (`device_del`) and hot-plug (`device_add`) during a run.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::{Error, Result};

/// A connected QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(socket: &Path) -> Result<Self> {
        let stream = UnixStream::connect(socket)
            .map_err(|e| Error::io(format!("connecting to QMP {}", socket.display()), e))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| Error::io("QMP timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io("cloning QMP socket", e))?;
        let mut me = Self {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = me.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(Error::Setup(format!("unexpected QMP greeting: {greeting}")));
        }
        me.execute("qmp_capabilities", json!({}))?;
        Ok(me)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| Error::io("reading QMP", e))?;
        if n == 0 {
            return Err(Error::Setup("QMP socket closed".into()));
        }
        serde_json::from_str(&line)
            .map_err(|e| Error::Setup(format!("bad QMP message {line:?}: {e}")))
    }

    /// Runs a command and returns its `return` value; events that arrive in
    /// between are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let msg = json!({ "execute": command, "arguments": arguments });
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| Error::io("writing QMP", e))?;
        loop {
            let reply = self.read_message()?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(Error::Setup(format!("QMP {command} failed: {err}")));
            }
        }
    }
}
