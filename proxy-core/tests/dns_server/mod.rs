//! A minimal authoritative DNS server on UDP 127.0.0.1 for tests: answers from a zone
//! the test edits (TTL 1), NXDOMAIN for unknown names, and nothing at all while silent
//! (the client times out: a failed resolution). Answers are encoded with hickory-proto.
//!
//! Shared by proxy-core's discovery tests and the `proxy` binary's tests (which include
//! this file by path), so both exercise the same server.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use hickory_resolver::proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, SRV};
pub use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::proto::rr::{Name, RData, Record};
use tokio::net::UdpSocket;

/// The records a [`Dns`] answers with, by (name, type).
type Zone = HashMap<(Name, RecordType), Vec<RData>>;

/// The server; stops when dropped.
pub struct Dns {
    /// Where it listens (UDP).
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    silent: Arc<AtomicBool>,
    queries: Arc<Mutex<HashMap<Name, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Dns {
    /// Start on a free port of 127.0.0.1, with an empty zone. Needs a tokio runtime.
    pub async fn start() -> Dns {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let zone: Arc<Mutex<Zone>> = Arc::default();
        let silent = Arc::new(AtomicBool::new(false));
        let queries: Arc<Mutex<HashMap<Name, u64>>> = Arc::default();
        let (z, s, q) = (zone.clone(), silent.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                if s.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                if let Some(first) = query.queries.first() {
                    *q.lock().unwrap().entry(first.name().clone()).or_default() += 1;
                }
                let reply = answer(&query, &z.lock().unwrap());
                let _ = socket.send_to(&reply.to_vec().unwrap(), peer).await;
            }
        });
        Dns {
            addr,
            zone,
            silent,
            queries,
            task,
        }
    }

    /// Answer `name` (fully qualified, with the final dot) of type `rtype` with `data`.
    pub fn set(&self, name: &str, rtype: RecordType, data: Vec<RData>) {
        let name = Name::from_ascii(name).unwrap();
        self.zone.lock().unwrap().insert((name, rtype), data);
    }

    /// Forget every record: every name is NXDOMAIN.
    pub fn clear(&self) {
        self.zone.lock().unwrap().clear();
    }

    /// How many queries (of any type) asked for `name` (fully qualified) so far.
    pub fn queries(&self, name: &str) -> u64 {
        let name = Name::from_ascii(name).unwrap();
        self.queries
            .lock()
            .unwrap()
            .get(&name)
            .copied()
            .unwrap_or(0)
    }

    /// Stop answering (queries time out), or answer again.
    pub fn set_silent(&self, silent: bool) {
        self.silent.store(silent, Ordering::SeqCst);
    }
}

fn answer(query: &Message, zone: &Zone) -> Message {
    let mut reply = Message::response(query.metadata.id, OpCode::Query);
    reply.metadata.message_type = MessageType::Response;
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    let Some(q) = query.queries.first() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply;
    };
    reply.add_query(q.clone());
    let known = zone.keys().any(|(n, _)| n == q.name());
    match zone.get(&(q.name().clone(), q.query_type())) {
        Some(data) => {
            for d in data {
                reply.add_answer(Record::from_rdata(q.name().clone(), 1, d.clone()));
            }
        }
        // The name exists with other types: NOERROR, no answer (NODATA).
        None if known => {}
        None => reply.metadata.response_code = ResponseCode::NXDomain,
    }
    reply
}

/// An A record.
pub fn a(ip: [u8; 4]) -> RData {
    RData::A(A(Ipv4Addr::from(ip)))
}

/// An SRV record.
pub fn srv(priority: u16, weight: u16, port: u16, target: &str) -> RData {
    RData::SRV(SRV::new(
        priority,
        weight,
        port,
        Name::from_ascii(target).unwrap(),
    ))
}
