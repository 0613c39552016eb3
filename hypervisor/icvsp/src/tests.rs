//! The four services against a fake guest that answers as Linux 6.1's hv_utils does: it
//! picks versions the way `vmbus_prep_negotiate_resp` does from its own lists, answers in
//! the buffer it received (same length, same transaction id, flags TRANSACTION|RESPONSE,
//! an inband packet without completion), and for KVP relays to a model of
//! `hv_kvp_daemon`, or holds every packet unread while no daemon runs.

use std::sync::Arc;
use std::time::Duration;

use vmbus_core::fake::FakeGuest;
use vmbus_core::ring::{Packet, pkt};
use vmbus_core::{Vsp, VspError};

use crate::icmsg::{BODY, Header, Version, flags, msgtype, status, u16_at, u32_at, u64_at};
use crate::*;

/// 2026-01-01T00:00:00Z as FILETIME.
const T0: u64 = FILETIME_UNIX_EPOCH + 1_767_225_600 * 10_000_000;

const V1: Version = Version::new(1, 0);
const V3: Version = Version::new(3, 0);
/// Linux's `fw_versions`, newest first.
const LINUX_FW: [Version; 2] = [V3, V1];
const LINUX_HB: [Version; 2] = [V3, V1];
const LINUX_SD: [Version; 4] = [Version::new(3, 2), Version::new(3, 1), V3, V1];
const LINUX_TS: [Version; 3] = [Version::new(4, 0), V3, V1];
const LINUX_KVP: [Version; 3] = [Version::new(4, 0), V3, V1];

/// What Linux's `vmbus_prep_negotiate_resp` does to the buffer in place; the chosen pair.
fn linux_negotiate(buf: &mut [u8], srv: &[Version]) -> Option<(Version, Version)> {
    let fw_count = usize::from(u16_at(buf, BODY)?);
    let msg_count = usize::from(u16_at(buf, BODY + 2)?);
    if fw_count > 100 || msg_count > 100 || BODY + 8 + 4 * (fw_count + msg_count) > buf.len() {
        return None;
    }
    let at = |i: usize| {
        let o = BODY + 8 + 4 * i;
        Version::new(u16_at(buf, o).unwrap(), u16_at(buf, o + 2).unwrap())
    };
    let fw = LINUX_FW
        .iter()
        .find(|v| (0..fw_count).any(|i| at(i) == **v));
    let msg = srv
        .iter()
        .find(|v| (fw_count..fw_count + msg_count).any(|i| at(i) == **v));
    buf[BODY - 10..BODY - 8].copy_from_slice(&0x10u16.to_le_bytes());
    let found = fw.zip(msg).map(|(f, m)| (*f, *m));
    let n: u16 = if found.is_some() { 1 } else { 0 };
    buf[BODY..BODY + 2].copy_from_slice(&n.to_le_bytes());
    buf[BODY + 2..BODY + 4].copy_from_slice(&n.to_le_bytes());
    if let Some((f, m)) = found {
        for (i, v) in [f, m].iter().enumerate() {
            let o = BODY + 8 + 4 * i;
            buf[o..o + 2].copy_from_slice(&v.major.to_le_bytes());
            buf[o + 2..o + 4].copy_from_slice(&v.minor.to_le_bytes());
        }
    }
    found
}

fn set_status(buf: &mut [u8], st: u32) {
    buf[20..24].copy_from_slice(&st.to_le_bytes());
}

/// A guest running one IC driver.
struct Guest<D: Vsp> {
    g: FakeGuest,
    dev: D,
    clock: Arc<ManualClock>,
}

impl<D: Vsp> Guest<D> {
    fn new(dev: D, clock: Arc<ManualClock>) -> Self {
        let mut g = FakeGuest::new();
        let mut dev = dev;
        g.open(&mut dev).unwrap();
        Guest { g, dev, clock }
    }

    /// Everything the host sent since last time.
    fn take(&mut self) -> Vec<Packet> {
        let v = self.g.recv_all().unwrap();
        for p in &v {
            assert_eq!(p.header.ptype, pkt::DATA_INBAND);
            assert_eq!(p.header.flags, 0, "the host asks for no completion");
            let h = Header::parse(p.payload()).unwrap();
            assert_eq!(h.flags, flags::TRANSACTION | flags::REQUEST);
            assert_eq!(u32_at(p.payload(), 4), Some(20 + u32::from(h.size)));
        }
        v
    }

    /// Send back `buf` as Linux does: flags set, same transaction id.
    fn reply(&mut self, p: &Packet, mut buf: Vec<u8>) -> Result<(), VspError> {
        buf[BODY - 3] = flags::TRANSACTION | flags::RESPONSE;
        self.g
            .send_raw(pkt::DATA_INBAND, 0, p.header.trans_id, &[], &buf)
            .unwrap();
        self.g.run(&mut self.dev)
    }

    /// Take the negotiate request and answer it with Linux's list `srv`.
    fn negotiate(&mut self, srv: &[Version]) -> Option<(Version, Version)> {
        let p = self.take().pop().expect("a negotiate request");
        let h = Header::parse(p.payload()).unwrap();
        assert_eq!(h.msgtype, msgtype::NEGOTIATE);
        let mut buf = p.payload().to_vec();
        let r = linux_negotiate(&mut buf, srv);
        self.reply(&p, buf).unwrap();
        r
    }

    fn run(&mut self) -> Result<(), VspError> {
        self.g.run(&mut self.dev)
    }

    fn later(&mut self, secs: u64) -> Result<(), VspError> {
        self.clock.advance(Duration::from_secs(secs));
        self.run()
    }
}

fn clock() -> Arc<ManualClock> {
    ManualClock::new(T0)
}

fn heartbeat() -> (Guest<Heartbeat>, Arc<HeartbeatHandle>) {
    let c = clock();
    let (dev, h) =
        Heartbeat::new(c.clone(), Duration::from_secs(2), Duration::from_secs(10)).unwrap();
    (Guest::new(dev, c), h)
}

/// Linux's heartbeat callback: sequence + 1.
fn answer_beat(p: &Packet) -> (Vec<u8>, u64) {
    let mut buf = p.payload().to_vec();
    let seq = u64_at(&buf, BODY).unwrap();
    buf[BODY..BODY + 8].copy_from_slice(&(seq + 1).to_le_bytes());
    (buf, seq)
}

#[test]
fn offers_are_pipes_with_hyper_v_guids() {
    let c = clock();
    let (hb, _) =
        Heartbeat::new(c.clone(), Duration::from_secs(1), Duration::from_secs(5)).unwrap();
    let (sd, _) = Shutdown::new(c.clone(), Duration::from_secs(5)).unwrap();
    let (ts, _) = TimeSync::new(c.clone(), Duration::from_secs(5), None).unwrap();
    let (kvp, _) = Kvp::new(c, Duration::from_secs(5), Duration::from_secs(5)).unwrap();
    let offers = [hb.offer(), sd.offer(), ts.offer(), kvp.offer()];
    // The class GUIDs as bytes on the wire (Linux's MODALIAS is these bytes in hex).
    let classes = [
        "394f16571591784eab55382f3bd5422d",
        "31600b0e13523449818b38d90ced39db",
        "30e62795aed07b49adcee80ab0175caf",
        "e7f4a0a9455a964db8278a841e8c03e6",
    ];
    for (o, class) in offers.iter().zip(classes) {
        let hex: String = o.class.0.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, class);
        assert_eq!((o.flags, o.pipe_mode, o.mmio_megabytes), (0x10, 4, 0));
    }
}

#[test]
fn linux_picks_its_newest_versions() {
    let (mut hb, h) = heartbeat();
    assert_eq!(hb.negotiate(&LINUX_HB), Some((V3, V3)));
    assert_eq!(h.status().version, Some(V3));
    let c = clock();
    let (sd, sh) = Shutdown::new(c.clone(), Duration::from_secs(5)).unwrap();
    let mut sd = Guest::new(sd, c.clone());
    assert_eq!(sd.negotiate(&LINUX_SD), Some((V3, Version::new(3, 2))));
    assert_eq!(sh.version(), Some(Version::new(3, 2)));
    let (ts, th) = TimeSync::new(c.clone(), Duration::from_secs(5), None).unwrap();
    let mut ts = Guest::new(ts, c.clone());
    assert_eq!(
        ts.negotiate(&LINUX_TS),
        Some((V3, V3)),
        "no 4.0 without a counter"
    );
    assert_eq!(th.status().version, Some(V3));
    let (ts4, th4) =
        TimeSync::new(c.clone(), Duration::from_secs(5), Some(Box::new(|| 7))).unwrap();
    let mut ts4 = Guest::new(ts4, c.clone());
    assert_eq!(ts4.negotiate(&LINUX_TS), Some((V3, Version::new(4, 0))));
    assert_eq!(th4.status().version, Some(Version::new(4, 0)));
    let (kvp, kh) = Kvp::new(c.clone(), Duration::from_secs(60), Duration::from_secs(45)).unwrap();
    let mut kvp = Guest::new(kvp, c);
    assert_eq!(kvp.negotiate(&LINUX_KVP), Some((V3, Version::new(4, 0))));
    assert_eq!(kh.guest_info().version, Some(Version::new(4, 0)));
}

#[test]
fn a_guest_without_common_versions_is_not_connected() {
    let c = clock();
    let (sd, sh) = Shutdown::new(c.clone(), Duration::from_secs(5)).unwrap();
    let mut sd = Guest::new(sd, c);
    assert_eq!(sd.negotiate(&[Version::new(9, 9)]), None);
    assert!(!sh.is_connected());
    assert_eq!(
        sh.request_shutdown(false, "x"),
        Err(ShutdownError::NotConnected)
    );
    sd.run().unwrap();
    assert!(sd.take().is_empty());
}

#[test]
fn heartbeats_answered_keep_the_guest_alive() {
    let (mut g, h) = heartbeat();
    assert_eq!(h.health(), HeartbeatHealth::NotConnected);
    g.negotiate(&LINUX_HB);
    for i in 1..=5u64 {
        let p = g.take().pop().expect("a heartbeat");
        assert_eq!(
            Header::parse(p.payload()).unwrap().msgtype,
            msgtype::HEARTBEAT
        );
        assert!(p.payload().len() >= BODY + 40);
        let (buf, seq) = answer_beat(&p);
        assert_eq!(seq, i);
        g.reply(&p, buf).unwrap();
        assert_eq!(h.status().last_sequence, Some(i + 1));
        // Nothing new before the interval.
        g.later(1).unwrap();
        assert!(g.take().is_empty());
        g.later(1).unwrap();
    }
    assert_eq!(h.health(), HeartbeatHealth::Ok);
    let s = h.status();
    assert_eq!((s.sent, s.answered), (6, 5));
    assert_eq!(h.since_last_answer(), Some(Duration::from_secs(2)));
}

#[test]
fn a_silent_guest_is_lost_and_never_flooded() {
    let (mut g, h) = heartbeat();
    g.negotiate(&LINUX_HB);
    let first = g.take().pop().unwrap();
    for _ in 0..30 {
        g.later(1).unwrap();
        assert!(g.take().is_empty(), "one heartbeat outstanding at most");
    }
    assert_eq!(h.health(), HeartbeatHealth::Lost);
    // The guest wakes up and answers: alive again, beats resume.
    let (buf, _) = answer_beat(&first);
    g.reply(&first, buf).unwrap();
    assert_eq!(h.health(), HeartbeatHealth::Ok);
    assert_eq!(g.take().len(), 1);
}

#[test]
fn a_wrong_sequence_closes_the_channel_and_reopening_recovers() {
    let (mut g, h) = heartbeat();
    g.negotiate(&LINUX_HB);
    let p = g.take().pop().unwrap();
    let (mut buf, _) = answer_beat(&p);
    buf[BODY] ^= 0x40;
    assert!(g.reply(&p, buf).is_err());
    g.dev.closed();
    assert_eq!(h.health(), HeartbeatHealth::NotConnected);
    let mut fresh = FakeGuest::new();
    fresh.open(&mut g.dev).unwrap();
    g.g = fresh;
    g.negotiate(&LINUX_HB);
    assert_eq!(h.health(), HeartbeatHealth::Ok);
}

/// Linux's shutdown callback: the status it writes and the action it would take.
fn answer_shutdown(p: &Packet) -> (Vec<u8>, &'static str) {
    answer_shutdown_raw(p.payload().to_vec())
}

fn answer_shutdown_raw(mut buf: Vec<u8>) -> (Vec<u8>, &'static str) {
    assert!(buf.len() >= BODY + 2060, "Linux drops shorter requests");
    let (st, action) = match u32_at(&buf, BODY + 8).unwrap() {
        0 | 1 => (status::S_OK, "poweroff"),
        2 | 3 => (status::S_OK, "reboot"),
        _ => (status::E_FAIL, "none"),
    };
    set_status(&mut buf, st);
    (buf, action)
}

#[test]
fn shutdown_is_sent_acked_and_reported() {
    let c = clock();
    let (sd, h) = Shutdown::new(c.clone(), Duration::from_secs(10)).unwrap();
    let mut g = Guest::new(sd, c);
    assert_eq!(
        h.request_shutdown(false, "x"),
        Err(ShutdownError::NotConnected)
    );
    g.negotiate(&LINUX_SD);
    assert!(h.is_connected());
    assert_eq!(h.outcome(), ShutdownOutcome::Idle);
    h.request_shutdown(false, "Parvis: stop requested").unwrap();
    assert_eq!(
        h.request_shutdown(true, "again"),
        Err(ShutdownError::InProgress)
    );
    g.run().unwrap();
    assert_eq!(h.outcome(), ShutdownOutcome::Sent);
    let p = g.take().pop().unwrap();
    let hd = Header::parse(p.payload()).unwrap();
    assert_eq!(hd.msgtype, msgtype::SHUTDOWN);
    assert_eq!(hd.message, Version::new(3, 2));
    let m = &p.payload()[BODY..];
    assert_eq!(u32_at(m, 0), Some(shutdown::REASON_PLANNED));
    let text: Vec<u16> = m[12..12 + 2 * 22]
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    assert_eq!(String::from_utf16(&text).unwrap(), "Parvis: stop requested");
    let (buf, action) = answer_shutdown(&p);
    assert_eq!(action, "poweroff");
    g.reply(&p, buf).unwrap();
    assert_eq!(h.outcome(), ShutdownOutcome::Accepted);
    // A restart.
    h.request_shutdown(true, "").unwrap();
    g.run().unwrap();
    let p = g.take().pop().unwrap();
    let (buf, action) = answer_shutdown(&p);
    assert_eq!(action, "reboot");
    g.reply(&p, buf).unwrap();
    assert_eq!(h.outcome(), ShutdownOutcome::Accepted);
}

#[test]
fn an_unanswered_shutdown_times_out_and_a_refusal_is_reported() {
    let c = clock();
    let (sd, h) = Shutdown::new(c.clone(), Duration::from_secs(10)).unwrap();
    let mut g = Guest::new(sd, c);
    g.negotiate(&LINUX_SD);
    h.request_shutdown(false, "").unwrap();
    g.run().unwrap();
    let p = g.take().pop().unwrap();
    g.later(5).unwrap();
    assert_eq!(h.outcome(), ShutdownOutcome::Sent);
    g.later(6).unwrap();
    assert_eq!(h.outcome(), ShutdownOutcome::TimedOut);
    // A late refusal is still recorded.
    let mut buf = p.payload().to_vec();
    set_status(&mut buf, status::E_FAIL);
    g.reply(&p, buf).unwrap();
    assert_eq!(h.outcome(), ShutdownOutcome::Refused(status::E_FAIL));
    g.dev.closed();
    assert!(!h.is_connected());
}

/// The time in a sample: (parent time, flags, reference time).
fn decode_time(p: &Packet, v4: bool) -> (u64, u8, Option<u64>) {
    let m = &p.payload()[BODY..];
    let ft = u64_at(m, 0).unwrap();
    if v4 {
        (ft, m[16], u64_at(m, 8))
    } else {
        (ft, m[24], None)
    }
}

#[test]
fn time_sync_sends_sync_then_samples_in_filetime() {
    let c = clock();
    let (ts, h) = TimeSync::new(c.clone(), Duration::from_secs(5), None).unwrap();
    let mut g = Guest::new(ts, c);
    g.negotiate(&LINUX_TS);
    let p = g.take().pop().expect("the first sync");
    assert_eq!(
        Header::parse(p.payload()).unwrap().msgtype,
        msgtype::TIMESYNC
    );
    assert!(
        p.payload().len() >= BODY + 25,
        "Linux needs ictimesync_data"
    );
    assert_eq!(decode_time(&p, false), (T0, timesync::FLAG_SYNC, None));
    // Linux turns it into Unix time: (t - WLTIMEDELTA) * 100 ns.
    assert_eq!((T0 - FILETIME_UNIX_EPOCH) / 10_000_000, 1_767_225_600);
    g.reply(&p, p.payload().to_vec()).unwrap();
    g.later(4).unwrap();
    assert!(g.take().is_empty());
    g.later(1).unwrap();
    let p = g.take().pop().expect("a sample");
    assert_eq!(
        decode_time(&p, false),
        (T0 + 5 * 10_000_000, timesync::FLAG_SAMPLE, None)
    );
    g.reply(&p, p.payload().to_vec()).unwrap();
    h.resync();
    g.run().unwrap();
    let p = g.take().pop().expect("a resync");
    assert_eq!(decode_time(&p, false).1, timesync::FLAG_SYNC);
    assert_eq!(h.status().samples_sent, 3);
}

#[test]
fn time_sync_v4_carries_the_reference_counter() {
    let c = clock();
    let (ts, _) = TimeSync::new(
        c.clone(),
        Duration::from_secs(5),
        Some(Box::new(|| 0x1234_5678_9abc)),
    )
    .unwrap();
    let mut g = Guest::new(ts, c);
    g.negotiate(&LINUX_TS);
    let p = g.take().pop().unwrap();
    assert!(
        p.payload().len() >= BODY + 22,
        "Linux needs ictimesync_ref_data"
    );
    assert_eq!(
        decode_time(&p, true),
        (T0, timesync::FLAG_SYNC, Some(0x1234_5678_9abc))
    );
}

/// A model of hv_kvp_daemon's auto pool behind the kernel relay.
struct Daemon {
    entries: Vec<(&'static str, String)>,
}

impl Daemon {
    fn linux() -> Self {
        Daemon {
            entries: vec![
                ("FullyQualifiedDomainName", "web1.example.org".into()),
                ("IntegrationServicesVersion", "3.1".into()),
                ("NetworkAddressIPv4", "10.0.2.15;192.168.7.2".into()),
                ("NetworkAddressIPv6", "fe80::5054:ff:fe12:3456".into()),
                ("OSBuildNumber", "6.1.0-41-amd64".into()),
                ("OSName", "Debian GNU/Linux".into()),
                ("OSMajorVersion", "6".into()),
                ("OSMinorVersion", "1".into()),
                ("OSVersion", "12".into()),
                ("ProcessorArchitecture", "x86_64".into()),
            ],
        }
    }

    /// The kernel's answer (`kvp_respond_to_host`) to the request in `buf`.
    fn answer(&self, buf: &mut [u8]) {
        let m = BODY;
        assert_eq!(buf[m], kvp::op::ENUMERATE);
        assert_eq!(buf[m + 1], kvp::pool::AUTO);
        let index = u32_at(buf, m + 4).unwrap() as usize;
        let Some((k, v)) = self.entries.get(index) else {
            set_status(buf, status::S_CONT);
            return;
        };
        put_utf16(buf, m + 20, m + 12, k);
        put_utf16(buf, m + 20 + 512, m + 16, v);
        buf[m + 8..m + 12].copy_from_slice(&kvp::value_type::SZ.to_le_bytes());
    }
}

/// Write `s` as UTF-16 with its NUL at `at` and its byte size at `size_at`.
fn put_utf16(buf: &mut [u8], at: usize, size_at: usize, s: &str) {
    let units: Vec<u16> = s.encode_utf16().chain([0]).collect();
    for (i, u) in units.iter().enumerate() {
        buf[at + 2 * i..at + 2 * i + 2].copy_from_slice(&u.to_le_bytes());
    }
    buf[size_at..size_at + 4].copy_from_slice(&(2 * units.len() as u32).to_le_bytes());
}

fn kvp() -> (Guest<Kvp>, Arc<KvpHandle>) {
    let c = clock();
    let (dev, h) = Kvp::new(c.clone(), Duration::from_secs(60), Duration::from_secs(45)).unwrap();
    (Guest::new(dev, c), h)
}

/// Answer every request the host sends until it stops; the number answered.
fn serve(g: &mut Guest<Kvp>, d: &Daemon) -> usize {
    let mut n = 0;
    while let Some(p) = g.take().pop() {
        assert_eq!(
            Header::parse(p.payload()).unwrap().msgtype,
            msgtype::KVP_EXCHANGE
        );
        let mut buf = p.payload().to_vec();
        d.answer(&mut buf);
        g.reply(&p, buf).unwrap();
        n += 1;
    }
    n
}

#[test]
fn kvp_learns_name_os_and_addresses_from_the_auto_pool() {
    let (mut g, h) = kvp();
    assert_eq!(h.state(), KvpState::Negotiating);
    g.negotiate(&LINUX_KVP);
    assert_eq!(
        serve(&mut g, &Daemon::linux()),
        11,
        "ten keys, then no more items"
    );
    let i = h.guest_info();
    assert_eq!(i.state, KvpState::Ready);
    assert_eq!(i.hostname.as_deref(), Some("web1.example.org"));
    assert_eq!(i.os_name.as_deref(), Some("Debian GNU/Linux"));
    assert_eq!(i.os_version.as_deref(), Some("12"));
    assert_eq!(i.os_build.as_deref(), Some("6.1.0-41-amd64"));
    assert_eq!(i.os_major_version.as_deref(), Some("6"));
    assert_eq!(i.processor_architecture.as_deref(), Some("x86_64"));
    assert_eq!(
        i.ipv4,
        vec![
            "10.0.2.15".parse::<std::net::Ipv4Addr>().unwrap(),
            "192.168.7.2".parse().unwrap()
        ]
    );
    assert_eq!(
        i.ipv6,
        vec![
            "fe80::5054:ff:fe12:3456"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
        ]
    );
    assert_eq!(i.entries.len(), 10);
    assert_eq!((i.passes, i.last_error), (1, None));
    // The next pass comes with the refresh period, or on demand.
    g.later(30).unwrap();
    assert!(g.take().is_empty());
    h.refresh();
    g.run().unwrap();
    let mut d = Daemon::linux();
    d.entries[0].1 = "web2".into();
    assert_eq!(serve(&mut g, &d), 11);
    assert_eq!(h.guest_info().hostname.as_deref(), Some("web2"));
    g.later(60).unwrap();
    assert_eq!(serve(&mut g, &d), 11);
    assert_eq!(h.guest_info().passes, 3);
}

#[test]
fn kvp_without_the_daemon_waits_quietly_and_resumes_when_it_starts() {
    let (mut g, h) = kvp();
    // The kernel leaves the negotiate request in the ring, unread.
    let nego = g.take().pop().unwrap();
    for _ in 0..20 {
        g.later(10).unwrap();
        assert!(
            g.take().is_empty(),
            "nothing more is sent to a guest that does not read"
        );
    }
    assert_eq!(h.state(), KvpState::NoDaemon);
    h.refresh();
    g.run().unwrap();
    assert!(g.take().is_empty());
    // hv_kvp_daemon starts: the kernel reads the channel and answers.
    let mut buf = nego.payload().to_vec();
    linux_negotiate(&mut buf, &LINUX_KVP).unwrap();
    g.reply(&nego, buf).unwrap();
    assert_eq!(serve(&mut g, &Daemon::linux()), 11);
    assert_eq!(h.guest_info().hostname.as_deref(), Some("web1.example.org"));
}

#[test]
fn kvp_daemon_timeouts_end_a_pass_and_a_dead_daemon_stalls() {
    let (mut g, h) = kvp();
    g.negotiate(&LINUX_KVP);
    assert_eq!(serve(&mut g, &Daemon::linux()), 11);
    // The daemon hangs: after 30 s the kernel fails the request (HV_E_FAIL).
    h.refresh();
    g.run().unwrap();
    let p = g.take().pop().unwrap();
    let mut buf = p.payload().to_vec();
    set_status(&mut buf, status::E_FAIL);
    g.reply(&p, buf).unwrap();
    let i = h.guest_info();
    assert_eq!(
        (i.state, i.last_error),
        (KvpState::Ready, Some(status::E_FAIL))
    );
    assert_eq!(i.hostname.as_deref(), Some("web1.example.org"), "kept");
    // The daemon exits: the next request is never read.
    h.refresh();
    g.run().unwrap();
    assert_eq!(g.take().len(), 1);
    g.later(46).unwrap();
    assert_eq!(h.state(), KvpState::Stalled);
    assert!(g.take().is_empty());
}

#[test]
fn kvp_strings_are_sanitized_and_capped() {
    let (mut g, h) = kvp();
    g.negotiate(&LINUX_KVP);
    let hostile = Daemon {
        entries: vec![
            ("FullyQualifiedDomainName", "evil\u{1b}[2J\nname".into()),
            ("OSName", "x".repeat(1000)),
            (
                "NetworkAddressIPv4",
                "1.2.3.4;not-an-ip;;999.1.1.1;5.6.7.8".into(),
            ),
        ],
    };
    assert_eq!(serve(&mut g, &hostile), 4);
    let i = h.guest_info();
    assert_eq!(i.hostname.as_deref(), Some("evil[2Jname"));
    assert_eq!(i.os_name.unwrap().len(), kvp::MAX_STRING_CHARS);
    assert_eq!(i.ipv4.len(), 2);
    // Unpaired surrogates become replacement characters; the NUL ends the string.
    let mut field = Vec::new();
    for u in [0x41u16, 0xd800, 0x42, 0, 0x43] {
        field.extend_from_slice(&u.to_le_bytes());
    }
    assert_eq!(kvp::utf16_string(&field, 10).as_deref(), Some("A\u{fffd}B"));
    assert_eq!(kvp::utf16_string(&field, 3), None);
    assert_eq!(kvp::utf16_string(&field, 12), None);
}

#[test]
fn garbage_kvp_answers_are_errors() {
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<Edit> = vec![
        // Key size beyond its field.
        Box::new(|b| b[BODY + 12..BODY + 16].copy_from_slice(&600u32.to_le_bytes())),
        // Odd value size.
        Box::new(|b| b[BODY + 16..BODY + 20].copy_from_slice(&7u32.to_le_bytes())),
        // Unknown value type.
        Box::new(|b| b[BODY + 8..BODY + 12].copy_from_slice(&0x77u32.to_le_bytes())),
        // A dword of the wrong size.
        Box::new(|b| b[BODY + 8..BODY + 12].copy_from_slice(&4u32.to_le_bytes())),
        // Message shorter than the enumerate body.
        Box::new(|b| {
            b.truncate(BODY + 100);
            b[BODY - 10..BODY - 8].copy_from_slice(&100u16.to_le_bytes());
        }),
    ];
    for (n, break_it) in cases.iter().enumerate() {
        let (mut g, _) = kvp();
        g.negotiate(&LINUX_KVP);
        let p = g.take().pop().unwrap();
        let mut buf = p.payload().to_vec();
        Daemon::linux().answer(&mut buf);
        break_it(&mut buf);
        assert!(g.reply(&p, buf).is_err(), "case {n}");
    }
}

#[test]
fn hostile_packets_are_errors_not_panics() {
    type Break = Box<dyn Fn(&mut FakeGuest, &Packet)>;
    let raw = |ptype: u16, id: Option<u64>, buf: Vec<u8>| -> Break {
        Box::new(move |g: &mut FakeGuest, p: &Packet| {
            g.send_raw(ptype, 0, id.unwrap_or(p.header.trans_id), &[], &buf)
                .unwrap();
        })
    };
    let answer = |edit: fn(&mut Vec<u8>)| -> Break {
        Box::new(move |g: &mut FakeGuest, p: &Packet| {
            let mut buf = p.payload().to_vec();
            linux_negotiate(&mut buf, &LINUX_HB);
            buf[BODY - 3] = flags::TRANSACTION | flags::RESPONSE;
            edit(&mut buf);
            g.send_raw(pkt::DATA_INBAND, 0, p.header.trans_id, &[], &buf)
                .unwrap();
        })
    };
    let cases: Vec<(&str, Break)> = vec![
        ("empty", raw(pkt::DATA_INBAND, None, vec![])),
        ("short header", raw(pkt::DATA_INBAND, None, vec![0; 20])),
        ("completion", raw(pkt::COMP, None, vec![0; 64])),
        ("unknown transaction", answer(|_| {})),
        ("not a response", answer(|b| b[BODY - 3] = flags::REQUEST)),
        ("other type", answer(|b| b[12] = 9)),
        (
            "size beyond packet",
            answer(|b| b[18..20].copy_from_slice(&0xfff0u16.to_le_bytes())),
        ),
        (
            "bad counts",
            answer(|b| b[BODY..BODY + 2].copy_from_slice(&3u16.to_le_bytes())),
        ),
        (
            "never offered",
            answer(|b| b[BODY + 12..BODY + 14].copy_from_slice(&7u16.to_le_bytes())),
        ),
        (
            "truncated negotiate",
            answer(|b| b[18..20].copy_from_slice(&2u16.to_le_bytes())),
        ),
    ];
    for (i, (name, send)) in cases.iter().enumerate() {
        let (mut g, h) = heartbeat();
        let p = g.take().pop().unwrap();
        if *name == "unknown transaction" {
            let mut buf = p.payload().to_vec();
            linux_negotiate(&mut buf, &LINUX_HB);
            buf[BODY - 3] = flags::TRANSACTION | flags::RESPONSE;
            g.g.send_raw(pkt::DATA_INBAND, 0, p.header.trans_id + 99, &[], &buf)
                .unwrap();
        } else {
            send(&mut g.g, &p);
        }
        assert!(g.run().is_err(), "case {i}: {name}");
        assert_eq!(h.health(), HeartbeatHealth::NotConnected, "{name}");
    }
    // An answer with no request outstanding.
    let (mut g, _) = heartbeat();
    g.negotiate(&LINUX_HB);
    let p = g.take().pop().unwrap();
    let (buf, _) = answer_beat(&p);
    g.reply(&p, buf.clone()).unwrap();
    assert!(g.reply(&p, buf).is_err());
}

#[test]
fn linux_refusals_of_bad_messages_are_survived() {
    // Linux answers an unknown shutdown flag with E_FAIL; the host reports it.
    let c = clock();
    let (sd, h) = Shutdown::new(c.clone(), Duration::from_secs(10)).unwrap();
    let mut g = Guest::new(sd, c);
    g.negotiate(&LINUX_SD);
    h.request_shutdown(false, "").unwrap();
    g.run().unwrap();
    let p = g.take().pop().unwrap();
    // The request as a confused guest read it: flags 0x40, which Linux refuses.
    let mut buf = p.payload().to_vec();
    buf[BODY + 8] = 0x40;
    let (buf, action) = answer_shutdown_raw(buf);
    assert_eq!(action, "none");
    g.reply(&p, buf).unwrap();
    assert_eq!(h.outcome(), ShutdownOutcome::Refused(status::E_FAIL));
}

#[test]
fn the_ticker_signals_every_wakeup() {
    let c = clock();
    let (_, hb) =
        Heartbeat::new(c.clone(), Duration::from_secs(1), Duration::from_secs(5)).unwrap();
    let (_, kv) = Kvp::new(c, Duration::from_secs(1), Duration::from_secs(5)).unwrap();
    let t = Ticker::spawn(Duration::from_millis(5), vec![hb.wakeup(), kv.wakeup()]).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    drop(t);
    assert!(hb.wakeup().take());
    assert!(kv.wakeup().take());
    hb.tick();
    assert!(hb.wakeup().take());
}

#[test]
fn the_system_clock_is_filetime() {
    let c = SystemClock::new();
    let ft = c.filetime();
    // After 2020-01-01 and before 2200.
    assert!(ft > FILETIME_UNIX_EPOCH + 1_577_836_800 * 10_000_000);
    assert!(ft < 0x0300_0000_0000_0000 * 2);
    assert!(c.monotonic() < Duration::from_secs(5));
}
