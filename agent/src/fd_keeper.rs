//! Keeping lazy mounts' FUSE connections open, and the registry credentials the
//! controller pushed, while the agent restarts.
//!
//! A FUSE mount lives as long as some process holds its `/dev/fuse` descriptor.
//! The [supervisor](crate::supervisor) holds a copy of every lazy mount's
//! descriptor for the agent's worker process; when the worker dies, the mounts stay
//! alive (the kernel queues their requests), and the next worker gets the
//! descriptors back and resumes serving them ([`stoker_lazyfs::resume`]).
//!
//! The keeper also holds the registry credentials pushed through `SetCredentials`
//! ([`crate::credentials`]), in memory like the worker, so that a new worker can
//! read private images at once instead of waiting for the controller's next
//! refresh. Expired entries are dropped; one entry per registry and prefix, the
//! latest.
//!
//! The two talk over a `SOCK_SEQPACKET` unix socket pair, one message per datagram,
//! descriptors passed with `SCM_RIGHTS`. A message is one kind byte and a payload:
//!
//! | kind | direction | payload | descriptor | meaning |
//! |---|---|---|---|---|
//! | `H` | worker → keeper | — | — | hello: send me what you keep |
//! | `k` | keeper → worker | mountpoint | yes | one kept mount |
//! | `c` | keeper → worker | `RegistryCredential` (protobuf) | — | one kept credential |
//! | `E` | keeper → worker | — | — | end of what is kept |
//! | `K` | worker → keeper | mountpoint | yes | keep this mount's descriptor |
//! | `F` | worker → keeper | mountpoint | — | forget this mount (unmounted) |
//! | `C` | worker → keeper | `RegistryCredential` (protobuf) | — | keep this credential |

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use prost::Message as _;
use stoker_api::agent::RegistryCredential;

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};

use crate::AgentError;

const HELLO: u8 = b'H';
const KEPT: u8 = b'k';
const KEPT_CREDENTIAL: u8 = b'c';
const END: u8 = b'E';
const KEEP: u8 = b'K';
const FORGET: u8 = b'F';
const KEEP_CREDENTIAL: u8 = b'C';

/// Longest message: a kind byte and a payload (a path or one credential).
const MAX_MESSAGE: usize = 64 << 10;

/// What a new worker gets back from the keeper.
#[derive(Debug, Default)]
pub struct Kept {
    /// Mounts still alive, each with its `/dev/fuse` descriptor.
    pub mounts: Vec<(PathBuf, OwnedFd)>,
    /// Pushed registry credentials not yet expired, oldest first.
    pub credentials: Vec<RegistryCredential>,
}

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

/// The supervisor's side: the kept descriptors, by mountpoint, and the kept
/// credentials. Outlives workers.
#[derive(Clone, Default)]
pub struct Keeper {
    kept: Arc<Mutex<HashMap<PathBuf, OwnedFd>>>,
    credentials: Arc<Mutex<KeptCredentials>>,
}

/// Credentials by `(registry, repository prefix)`, each with its arrival number.
#[derive(Default)]
struct KeptCredentials {
    next: u64,
    entries: HashMap<(String, String), (u64, RegistryCredential)>,
}

impl KeptCredentials {
    fn keep(&mut self, credential: RegistryCredential) {
        let now = unix_now();
        self.entries
            .retain(|_, (_, kept)| kept.expires_at_unix > now);
        let key = (
            credential.registry.clone(),
            credential.repository_prefix.clone(),
        );
        if credential.expires_at_unix > now {
            self.next += 1;
            self.entries.insert(key, (self.next, credential));
        } else {
            self.entries.remove(&key);
        }
    }

    /// The unexpired entries, oldest first (a replay gives the same result).
    fn current(&self) -> Vec<RegistryCredential> {
        let now = unix_now();
        let mut current: Vec<&(u64, RegistryCredential)> = self
            .entries
            .values()
            .filter(|(_, c)| c.expires_at_unix > now)
            .collect();
        current.sort_by_key(|(arrival, _)| *arrival);
        current.into_iter().map(|(_, c)| c.clone()).collect()
    }
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
        lock(&self.kept)
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
            let Message { kind, payload, fd } = message;
            match (kind, fd) {
                (HELLO, _) => {
                    if let Err(e) = self.send_kept(socket.as_fd()) {
                        tracing::warn!(error = %e, "fd keeper: handing mounts to the worker");
                        return;
                    }
                }
                (KEEP, Some(fd)) => {
                    let mountpoint = mountpoint(&payload);
                    tracing::debug!(mountpoint = %mountpoint.display(), "fd keeper: keeping a mount");
                    self.lock().insert(mountpoint, fd);
                }
                (FORGET, _) => {
                    let mountpoint = mountpoint(&payload);
                    tracing::debug!(mountpoint = %mountpoint.display(), "fd keeper: forgetting a mount");
                    self.lock().remove(&mountpoint);
                }
                (KEEP_CREDENTIAL, _) => match RegistryCredential::decode(&payload[..]) {
                    Ok(credential) => lock(&self.credentials).keep(credential),
                    // Never the bytes: they hold a secret.
                    Err(e) => tracing::warn!(error = %e, "fd keeper: an undecodable credential"),
                },
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
            send(socket, KEPT, path_bytes(path), Some(fd.as_fd()))?;
        }
        let credentials = lock(&self.credentials).current();
        for credential in &credentials {
            send(socket, KEPT_CREDENTIAL, &credential.encode_to_vec(), None)?;
        }
        send(socket, END, &[], None)
    }
}

/// The worker's side.
#[derive(Debug)]
pub struct KeeperClient {
    socket: OwnedFd,
}

impl KeeperClient {
    /// Says hello on `socket` and returns the client with what the keeper holds
    /// from the previous worker: mounts with their `/dev/fuse` descriptors, and
    /// credentials.
    pub fn connect(socket: OwnedFd) -> Result<(KeeperClient, Kept), AgentError> {
        send(socket.as_fd(), HELLO, &[], None)?;
        let mut buffer = vec![0u8; MAX_MESSAGE];
        let mut kept = Kept::default();
        loop {
            match receive(socket.as_fd(), &mut buffer)? {
                Some(Message {
                    kind: KEPT,
                    payload,
                    fd: Some(fd),
                }) => kept.mounts.push((mountpoint(&payload), fd)),
                Some(Message {
                    kind: KEPT_CREDENTIAL,
                    payload,
                    ..
                }) => match RegistryCredential::decode(&payload[..]) {
                    Ok(credential) => kept.credentials.push(credential),
                    Err(e) => tracing::warn!(error = %e, "fd keeper: an undecodable credential"),
                },
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
        send(
            self.socket.as_fd(),
            KEEP,
            path_bytes(mountpoint),
            Some(fuse_device),
        )
    }

    /// Tells the keeper the mount at `mountpoint` is gone.
    pub fn forget(&self, mountpoint: &Path) -> Result<(), AgentError> {
        send(self.socket.as_fd(), FORGET, path_bytes(mountpoint), None)
    }

    /// Asks the keeper to hold `credentials` (accepted by the worker's store).
    pub fn keep_credentials(&self, credentials: &[RegistryCredential]) -> Result<(), AgentError> {
        for credential in credentials {
            send(
                self.socket.as_fd(),
                KEEP_CREDENTIAL,
                &credential.encode_to_vec(),
                None,
            )?;
        }
        Ok(())
    }
}

struct Message {
    kind: u8,
    payload: Vec<u8>,
    fd: Option<OwnedFd>,
}

/// The payload of a mount message.
fn mountpoint(payload: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(payload))
}

fn path_bytes(path: &Path) -> &[u8] {
    path.as_os_str().as_bytes()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section is one map operation, so a poisoned map is whole.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn send(
    socket: BorrowedFd<'_>,
    kind: u8,
    payload: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), AgentError> {
    if payload.len() + 1 > MAX_MESSAGE {
        return Err(AgentError::InvalidArgument(format!(
            "fd keeper: a message of {} bytes is too long",
            payload.len()
        )));
    }
    let kind = [kind];
    let iov = [IoSlice::new(&kind), IoSlice::new(payload)];
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
        payload: buffer[1..length].to_vec(),
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
        assert!(kept.mounts.is_empty() && kept.credentials.is_empty());
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
        assert_eq!(kept.mounts.len(), 1);
        assert_eq!(kept.mounts[0].0, Path::new("/mnt/one"));
        let mut writer =
            std::os::unix::net::UnixStream::from(kept.mounts.into_iter().next().unwrap().1);
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

    fn credential(registry: &str, user: &str, expires_at_unix: i64) -> RegistryCredential {
        RegistryCredential {
            registry: registry.into(),
            repository_prefix: "team".into(),
            username: user.into(),
            password: format!("{user}-secret"),
            identity_token: String::new(),
            expires_at_unix,
        }
    }

    #[test]
    fn the_latest_unexpired_credentials_reach_the_next_worker() {
        let keeper = Keeper::default();
        let (theirs, ours) = socket_pair().expect("socket pair");
        let serving = {
            let keeper = keeper.clone();
            std::thread::spawn(move || keeper.serve(theirs))
        };
        let (client, _) = KeeperClient::connect(ours).expect("connect");
        let later = unix_now() + 3600;
        client
            .keep_credentials(&[
                credential("a.example", "old", later),
                credential("b.example", "bee", later),
                credential("c.example", "expired", unix_now() - 1),
            ])
            .expect("keep");
        client
            .keep_credentials(&[credential("a.example", "new", later)])
            .expect("keep");
        drop(client);
        serving.join().expect("keeper thread");

        let (theirs, ours) = socket_pair().expect("socket pair");
        let serving = {
            let keeper = keeper.clone();
            std::thread::spawn(move || keeper.serve(theirs))
        };
        let (client, kept) = KeeperClient::connect(ours).expect("connect");
        let users: Vec<&str> = kept
            .credentials
            .iter()
            .map(|c| c.username.as_str())
            .collect();
        assert_eq!(users, ["bee", "new"], "latest per key, oldest first");
        assert_eq!(kept.credentials[1].password, "new-secret");
        drop(client);
        serving.join().expect("keeper thread");
    }
}
