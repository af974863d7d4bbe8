//! Keeping lazy mounts' FUSE connections open while the agent restarts.
//!
//! A FUSE mount lives as long as some process holds its `/dev/fuse` descriptor.
//! The [supervisor](crate::supervisor) holds a copy of every lazy mount's
//! descriptor for the agent's worker process; when the worker dies, the mounts stay
//! alive (the kernel queues their requests), and the next worker gets the
//! descriptors back and resumes serving them ([`stoker_lazyfs::resume`]).
//!
//! The two talk over a `SOCK_SEQPACKET` unix socket pair, one message per datagram,
//! descriptors passed with `SCM_RIGHTS`. A message is one kind byte and a
//! mountpoint path:
//!
//! | kind | direction | descriptor | meaning |
//! |---|---|---|---|
//! | `H` | worker → keeper | — | hello: send me what you keep |
//! | `k` | keeper → worker | yes | one kept mount |
//! | `E` | keeper → worker | — | end of the kept mounts |
//! | `K` | worker → keeper | yes | keep this mount's descriptor |
//! | `F` | worker → keeper | — | forget this mount (unmounted) |

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};

use crate::AgentError;

const HELLO: u8 = b'H';
const KEPT: u8 = b'k';
const END: u8 = b'E';
const KEEP: u8 = b'K';
const FORGET: u8 = b'F';

/// Longest message: a kind byte and a path (mountpoints are well under this).
const MAX_MESSAGE: usize = 8192;

/// A connected socket pair for one worker: the keeper's end and the worker's.
pub fn socket_pair() -> Result<(OwnedFd, OwnedFd), AgentError> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| AgentError::io("creating the fd keeper's socket pair", e.into()))
}

/// The supervisor's side: the kept descriptors, by mountpoint. Outlives workers.
#[derive(Clone, Default)]
pub struct Keeper {
    kept: Arc<Mutex<HashMap<PathBuf, OwnedFd>>>,
}

impl Keeper {
    /// How many mounts are kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PathBuf, OwnedFd>> {
        // Each critical section is one map operation, so a poisoned map is whole.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves one worker on `socket` until it closes its end (it exited). Blocking:
    /// run it on its own thread.
    pub fn serve(&self, socket: OwnedFd) {
        let mut buffer = vec![0u8; MAX_MESSAGE];
        loop {
            let message = match receive(socket.as_fd(), &mut buffer) {
                Ok(Some(message)) => message,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "fd keeper: reading from the worker");
                    return;
                }
            };
            match (message.kind, message.fd) {
                (HELLO, _) => {
                    if let Err(e) = self.send_kept(socket.as_fd()) {
                        tracing::warn!(error = %e, "fd keeper: handing mounts to the worker");
                        return;
                    }
                }
                (KEEP, Some(fd)) => {
                    tracing::debug!(mountpoint = %message.path.display(), "fd keeper: keeping a mount");
                    self.lock().insert(message.path, fd);
                }
                (FORGET, _) => {
                    tracing::debug!(mountpoint = %message.path.display(), "fd keeper: forgetting a mount");
                    self.lock().remove(&message.path);
                }
                (kind, _) => {
                    tracing::warn!(
                        kind = %char::from(kind),
                        "fd keeper: unexpected message from the worker"
                    );
                }
            }
        }
    }

    fn send_kept(&self, socket: BorrowedFd<'_>) -> Result<(), AgentError> {
        // Duplicates, so the map keeps its copies until the worker says otherwise.
        let kept: Vec<(PathBuf, OwnedFd)> = self
            .lock()
            .iter()
            .filter_map(|(path, fd)| Some((path.clone(), fd.try_clone().ok()?)))
            .collect();
        for (path, fd) in &kept {
            send(socket, KEPT, path, Some(fd.as_fd()))?;
        }
        send(socket, END, Path::new(""), None)
    }
}

/// The worker's side.
#[derive(Debug)]
pub struct KeeperClient {
    socket: OwnedFd,
}

impl KeeperClient {
    /// Says hello on `socket` and returns the client with the mounts the keeper
    /// holds (from the previous worker), each with its `/dev/fuse` descriptor.
    pub fn connect(socket: OwnedFd) -> Result<(KeeperClient, Vec<(PathBuf, OwnedFd)>), AgentError> {
        send(socket.as_fd(), HELLO, Path::new(""), None)?;
        let mut buffer = vec![0u8; MAX_MESSAGE];
        let mut kept = Vec::new();
        loop {
            match receive(socket.as_fd(), &mut buffer)? {
                Some(Message {
                    kind: KEPT,
                    path,
                    fd: Some(fd),
                }) => kept.push((path, fd)),
                Some(Message { kind: END, .. }) => break,
                Some(other) => {
                    return Err(AgentError::io(
                        "fd keeper handshake",
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("unexpected message {:?}", char::from(other.kind)),
                        ),
                    ));
                }
                None => {
                    return Err(AgentError::io(
                        "fd keeper handshake",
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
            }
        }
        Ok((KeeperClient { socket }, kept))
    }

    /// Asks the keeper to hold `fuse_device`, the descriptor of the mount at
    /// `mountpoint`.
    pub fn keep(&self, mountpoint: &Path, fuse_device: BorrowedFd<'_>) -> Result<(), AgentError> {
        send(self.socket.as_fd(), KEEP, mountpoint, Some(fuse_device))
    }

    /// Tells the keeper the mount at `mountpoint` is gone.
    pub fn forget(&self, mountpoint: &Path) -> Result<(), AgentError> {
        send(self.socket.as_fd(), FORGET, mountpoint, None)
    }
}

struct Message {
    kind: u8,
    path: PathBuf,
    fd: Option<OwnedFd>,
}

fn send(
    socket: BorrowedFd<'_>,
    kind: u8,
    path: &Path,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), AgentError> {
    let path = path.as_os_str().as_bytes();
    if path.len() + 1 > MAX_MESSAGE {
        return Err(AgentError::InvalidArgument(format!(
            "fd keeper: path of {} bytes is too long",
            path.len()
        )));
    }
    let kind = [kind];
    let iov = [IoSlice::new(&kind), IoSlice::new(path)];
    let fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(socket.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)
        .map_err(|e| AgentError::io("fd keeper: sending", e.into()))?;
    Ok(())
}

/// One message, or `None` at end of stream (the other process exited).
fn receive(socket: BorrowedFd<'_>, buffer: &mut [u8]) -> Result<Option<Message>, AgentError> {
    let mut control = nix::cmsg_space!([RawFd; 1]);
    let (length, received) = {
        let mut iov = [IoSliceMut::new(buffer)];
        let message = loop {
            match recvmsg::<()>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut control),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other,
            }
        }
        .map_err(|e| AgentError::io("fd keeper: receiving", e.into()))?;
        let mut received = Vec::new();
        for cmsg in message
            .cmsgs()
            .map_err(|e| AgentError::io("fd keeper: control message", e.into()))?
        {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                received.extend(fds);
            }
        }
        (message.bytes, received)
    };
    // SAFETY: the kernel installed these descriptors in this process for this
    // message (SCM_RIGHTS); nothing else refers to them, so each gets one owner.
    let mut fds = received
        .into_iter()
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    if length == 0 {
        return Ok(None);
    }
    let fd = fds.next();
    Ok(Some(Message {
        kind: buffer[0],
        path: PathBuf::from(OsStr::from_bytes(&buffer[1..length])),
        fd,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn kept_descriptors_survive_one_worker_and_reach_the_next() {
        let keeper = Keeper::default();
        let (theirs, ours) = socket_pair().expect("socket pair");
        let serving = {
            let keeper = keeper.clone();
            std::thread::spawn(move || keeper.serve(theirs))
        };
        let (client, kept) = KeeperClient::connect(ours).expect("connect");
        assert!(kept.is_empty());
        let (mut reader, writer) = std::os::unix::net::UnixStream::pair().expect("pair");
        client
            .keep(Path::new("/mnt/one"), writer.as_fd())
            .expect("keep");
        client
            .keep(Path::new("/mnt/two"), writer.as_fd())
            .expect("keep");
        client.forget(Path::new("/mnt/two")).expect("forget");
        drop(writer);
        drop(client);
        serving.join().expect("keeper thread");
        assert_eq!(keeper.len(), 1);

        // The next worker gets the kept descriptor, and it is the same socket.
        let (theirs, ours) = socket_pair().expect("socket pair");
        let serving = {
            let keeper = keeper.clone();
            std::thread::spawn(move || keeper.serve(theirs))
        };
        let (_client, kept) = KeeperClient::connect(ours).expect("connect");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].0, Path::new("/mnt/one"));
        let mut writer = std::os::unix::net::UnixStream::from(kept.into_iter().next().unwrap().1);
        writer.write_all(b"still here").expect("write");
        drop(writer);
        drop(_client);
        serving.join().expect("keeper thread");
        // The keeper still holds its copy: close it so the reader sees the end.
        drop(keeper);
        let mut text = String::new();
        reader.read_to_string(&mut text).expect("read");
        assert_eq!(text, "still here");
    }
}
