//! How the ranks of a run started by `torchrun` (or by hand, with its variables) find each other before a
//! GPU collective exists: rank 0 listens on `MASTER_PORT`, every other rank connects to
//! `MASTER_ADDR:MASTER_PORT`, and once all of them are there rank 0 sends each one the same bytes (NCCL's
//! unique id, which every rank needs to make the communicator). The bytes are opaque here.
//!
//! The wire protocol, over one TCP connection per rank, all integers little-endian u32:
//! - rank → rank 0: [`HELLO`], its rank, its world size;
//! - rank 0 → rank: 0, length, the bytes, when every rank has joined; or 1, length, a one-line error
//!   (the run is refused: a wrong world size, a rank twice, a rank missing at the deadline).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use candle_core::Result;

/// The start of every rank's first message, so that something else connecting to the port is told apart.
const HELLO: [u8; 4] = *b"ngpt";
const OK: u32 = 0;
const REFUSED: u32 = 1;
/// Longest message accepted (an error line or the payload): anything longer is not from a rank.
const MAX_MESSAGE: u32 = 1 << 16;
/// Pause between attempts: connecting to a rank 0 not listening yet, or polling for the next rank.
const RETRY: Duration = Duration::from_millis(50);
/// How long past the deadline a rank waits for rank 0 to say why the run could not start.
const VERDICT_GRACE: Duration = Duration::from_secs(1);

/// Where rank 0 listens, and who this process is: torchrun's `MASTER_ADDR`, `MASTER_PORT`, `RANK` and `WORLD_SIZE`.
#[derive(Clone, Debug)]
pub struct Rendezvous {
    pub master_addr: String,
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    /// How long every rank waits for the others, from the call.
    pub timeout: Duration,
}

impl Rendezvous {
    /// Returns rank 0's `payload` on every rank, once all `world_size` ranks have joined. `payload` is called on
    /// rank 0 only.
    pub fn share(&self, payload: impl FnOnce() -> Result<Vec<u8>>) -> Result<Vec<u8>> {
        if self.world_size == 0 || self.rank >= self.world_size {
            candle_core::bail!(
                "RANK={} and WORLD_SIZE={} do not name a rank of the run; start the processes with torchrun --nproc_per_node=N",
                self.rank,
                self.world_size
            );
        }
        if self.world_size > 1 && self.master_port == 0 {
            candle_core::bail!("MASTER_PORT=0 is not a port the ranks can meet at; set MASTER_PORT (torchrun's default is 29500)");
        }
        let deadline = Instant::now() + self.timeout;
        if self.rank == 0 {
            self.serve(payload()?, deadline)
        } else {
            self.join(deadline)
        }
    }

    fn address(&self) -> String {
        format!("{}:{}", self.master_addr, self.master_port)
    }

    /// Rank 0: waits for every other rank, then answers each with `payload` (or all with the reason the run is refused).
    fn serve(&self, payload: Vec<u8>, deadline: Instant) -> Result<Vec<u8>> {
        if self.world_size == 1 {
            return Ok(payload);
        }
        // Every interface: MASTER_ADDR is how the others reach this machine, which may not be an address of its own.
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, self.master_port)).map_err(|e| {
            candle_core::Error::Msg(format!(
                "rank 0 cannot listen on port {} for the other ranks ({e}); set MASTER_PORT to a free port",
                self.master_port
            ))
        })?;
        listener.set_nonblocking(true)?;
        let mut ranks: Vec<Option<TcpStream>> = (0..self.world_size).map(|_| None).collect();
        let outcome = self.gather(&listener, &mut ranks, deadline);
        let reply = match &outcome {
            Ok(()) => (OK, payload.as_slice()),
            Err(message) => (REFUSED, message.as_bytes()),
        };
        for stream in ranks.iter_mut().flatten() {
            // A rank that has gone away learns nothing more; the others still get their answer.
            let _ = send(stream, reply.0, reply.1);
        }
        outcome.map(|()| payload).map_err(candle_core::Error::Msg)
    }

    /// Accepts ranks into `ranks` until all are there; the error is the line every rank will print.
    fn gather(&self, listener: &TcpListener, ranks: &mut [Option<TcpStream>], deadline: Instant) -> std::result::Result<(), String> {
        let mut joined = 1;
        while joined < self.world_size {
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> = (1..self.world_size).filter(|&r| ranks[r].is_none()).map(|r| r.to_string()).collect();
                return Err(format!(
                    "{} {} of {} never reached rank 0 at {} within {:.0?}; start every rank with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE",
                    if missing.len() == 1 { "rank" } else { "ranks" },
                    missing.join(", "),
                    self.world_size,
                    self.address(),
                    self.timeout
                ));
            }
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(RETRY.min(deadline - now));
                    continue;
                }
                Err(e) => return Err(format!("rank 0 stopped accepting ranks at {} ({e})", self.address())),
            };
            // The hello is 12 bytes sent at once; a peer that does not send it within a second is not a rank.
            let hello = stream
                .set_nonblocking(false)
                .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(1).min(deadline - now))))
                .and_then(|()| read_hello(&mut stream));
            let Ok((rank, world_size)) = hello else { continue };
            if world_size != self.world_size {
                let message = format!(
                    "rank {rank} says WORLD_SIZE={world_size} but rank 0 says {}; start every rank with the same WORLD_SIZE",
                    self.world_size
                );
                let _ = send(&mut stream, REFUSED, message.as_bytes());
                return Err(message);
            }
            if rank == 0 || rank >= self.world_size || ranks[rank].is_some() {
                let message = format!(
                    "two processes joined as rank {rank} (or it is not a rank of {}); give each process its own RANK",
                    self.world_size
                );
                let _ = send(&mut stream, REFUSED, message.as_bytes());
                return Err(message);
            }
            ranks[rank] = Some(stream);
            joined += 1;
        }
        Ok(())
    }

    /// Any other rank: connects to rank 0 (which may not be listening yet) and waits for its answer.
    fn join(&self, deadline: Instant) -> Result<Vec<u8>> {
        let address = self.address();
        let unreachable = |why: String| {
            candle_core::Error::Msg(format!(
                "rank {} cannot reach rank 0 at {address} within {:.0?} ({why}); start rank 0, and give every rank the MASTER_ADDR and MASTER_PORT where it listens",
                self.rank, self.timeout
            ))
        };
        let mut stream = loop {
            let attempt = address
                .to_socket_addrs()
                .and_then(|mut addrs| addrs.next().ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no address")))
                .and_then(|addr| TcpStream::connect_timeout(&addr, RETRY.max(deadline.saturating_duration_since(Instant::now()))));
            match attempt {
                Ok(stream) => break stream,
                Err(e) if Instant::now() + RETRY >= deadline => return Err(unreachable(e.to_string())),
                Err(_) => std::thread::sleep(RETRY),
            }
        };
        let mut hello = HELLO.to_vec();
        hello.extend_from_slice(&(self.rank as u32).to_le_bytes());
        hello.extend_from_slice(&(self.world_size as u32).to_le_bytes());
        stream.write_all(&hello).map_err(|e| unreachable(e.to_string()))?;
        // Rank 0 decides when the time is up and says why; this rank waits a little longer to hear it.
        let wait = deadline.saturating_duration_since(Instant::now()) + VERDICT_GRACE;
        stream.set_read_timeout(Some(wait))?;
        match receive(&mut stream) {
            Ok((OK, payload)) => Ok(payload),
            Ok((_, message)) => Err(candle_core::Error::Msg(String::from_utf8_lossy(&message).into_owned())),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => candle_core::bail!(
                "rank {} reached rank 0 at {address} but not every rank joined within {:.0?}; start all {} ranks",
                self.rank,
                self.timeout,
                self.world_size
            ),
            Err(e) => candle_core::bail!("rank 0 at {address} closed the connection ({e}); see rank 0's error"),
        }
    }
}

fn read_u32(stream: &mut TcpStream) -> std::io::Result<u32> {
    let mut bytes = [0u8; 4];
    stream.read_exact(&mut bytes)?;
    Ok(u32::from_le_bytes(bytes))
}

fn read_hello(stream: &mut TcpStream) -> std::io::Result<(usize, usize)> {
    let mut magic = [0u8; 4];
    stream.read_exact(&mut magic)?;
    if magic != HELLO {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "not a rank"));
    }
    Ok((read_u32(stream)? as usize, read_u32(stream)? as usize))
}

fn send(stream: &mut TcpStream, status: u32, bytes: &[u8]) -> std::io::Result<()> {
    let mut message = Vec::with_capacity(8 + bytes.len());
    message.extend_from_slice(&status.to_le_bytes());
    message.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    message.extend_from_slice(bytes);
    stream.write_all(&message)
}

fn receive(stream: &mut TcpStream) -> std::io::Result<(u32, Vec<u8>)> {
    let status = read_u32(stream)?;
    let len = read_u32(stream)?;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("a message of {len} bytes is not from rank 0")));
    }
    let mut bytes = vec![0u8; len as usize];
    stream.read_exact(&mut bytes)?;
    Ok((status, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port nothing listens on now (the OS's pick, released at once).
    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }

    fn rendezvous(port: u16, rank: usize, world_size: usize, timeout: Duration) -> Rendezvous {
        Rendezvous { master_addr: "127.0.0.1".into(), master_port: port, rank, world_size, timeout }
    }

    /// Runs `ranks` (rank, world size) on threads, each with `timeout`; returns each one's result, in order.
    fn run(ranks: &[(usize, usize)], timeout: Duration) -> Vec<Result<Vec<u8>>> {
        let port = free_port();
        let payload: Vec<u8> = (0..128).map(|i| (i * 7 + 3) as u8).collect();
        std::thread::scope(|scope| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|&(rank, world_size)| {
                    let payload = payload.clone();
                    scope.spawn(move || rendezvous(port, rank, world_size, timeout).share(|| Ok(payload)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("no panic in a rank")).collect()
        })
    }

    #[test]
    fn every_rank_gets_rank_0s_bytes() {
        let expected: Vec<u8> = (0..128).map(|i| (i * 7 + 3) as u8).collect();
        // Rank 0 last, so that the others start before it listens and must retry.
        let results = run(&[(3, 4), (1, 4), (2, 4), (0, 4)], Duration::from_secs(10));
        for result in results {
            assert_eq!(result.unwrap(), expected);
        }
    }

    #[test]
    fn a_run_of_one_needs_no_network() {
        let only =
            Rendezvous { master_addr: "no-such-host.invalid".into(), master_port: 1, rank: 0, world_size: 1, timeout: Duration::ZERO };
        assert_eq!(only.share(|| Ok(vec![1, 2, 3])).unwrap(), [1, 2, 3]);
    }

    #[test]
    fn a_missing_rank_fails_the_others_within_the_deadline() {
        let timeout = Duration::from_millis(800);
        let start = Instant::now();
        // Rank 2 of 3 never starts.
        let results = run(&[(0, 3), (1, 3)], timeout);
        assert!(start.elapsed() < timeout + Duration::from_secs(2), "took {:?}", start.elapsed());
        for result in results {
            let message = result.unwrap_err().to_string();
            assert!(message.contains("rank 2 of 3 never reached rank 0 at 127.0.0.1:"), "{message}");
            assert!(message.contains("MASTER_ADDR"), "{message}");
        }
    }

    #[test]
    fn a_rank_without_rank_0_names_the_address_and_the_fix() {
        let port = free_port();
        let start = Instant::now();
        let message = rendezvous(port, 1, 2, Duration::from_millis(300)).share(|| unreachable!()).unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
        assert!(message.starts_with(&format!("rank 1 cannot reach rank 0 at 127.0.0.1:{port} within 300ms")), "{message}");
        assert!(message.contains("start rank 0"), "{message}");
    }

    #[test]
    fn a_wrong_world_size_is_refused_on_both_sides() {
        let results = run(&[(0, 2), (1, 3)], Duration::from_secs(10));
        for result in results {
            let message = result.unwrap_err().to_string();
            assert_eq!(message, "rank 1 says WORLD_SIZE=3 but rank 0 says 2; start every rank with the same WORLD_SIZE");
        }
    }

    #[test]
    fn a_rank_twice_is_refused() {
        let results = run(&[(0, 3), (1, 3), (1, 3)], Duration::from_secs(2));
        // The first rank 1 waits for rank 2 and hears why the run stopped; the second is refused at once.
        for result in results {
            let message = result.unwrap_err().to_string();
            assert!(message.starts_with("two processes joined as rank 1"), "{message}");
        }
    }

    #[test]
    fn a_rank_outside_the_world_is_refused_before_any_network() {
        let message = rendezvous(free_port(), 2, 2, Duration::ZERO).share(|| unreachable!()).unwrap_err().to_string();
        assert!(message.contains("RANK=2 and WORLD_SIZE=2 do not name a rank"), "{message}");
    }
}
