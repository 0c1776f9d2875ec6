//! Unit tests of the store: one seam (sled on a temp dir), no journal thread.

use super::*;

fn cfg(max_bytes: u64, policy: FullPolicy) -> StoreConfig {
    StoreConfig {
        max_bytes,
        full_policy: policy,
        ..StoreConfig::default()
    }
}

fn rec(topic: &str, n: u32) -> Record {
    Record {
        topic: topic.into(),
        payload: Bytes::from(n.to_string()),
        retain: false,
        ts_ms: now_ms(),
    }
}

fn recs(range: std::ops::Range<u32>) -> Vec<Record> {
    range.map(|i| rec("t", i)).collect()
}

fn payloads(v: &[(u64, Record)]) -> Vec<String> {
    v.iter()
        .map(|(_, r)| String::from_utf8_lossy(&r.payload).into_owned())
        .collect()
}

/// A new store on the defaults in a temp dir (kept alive by the returned guard).
fn fresh() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(
        &dir.path().join("q"),
        &StoreConfig::default(),
        StoreMetrics::new(),
    )
    .unwrap();
    (dir, s)
}

#[test]
fn records_are_visible_only_once_committed() {
    let (_dir, s) = fresh();
    let a = s.append(&recs(0..3)).unwrap();
    assert_eq!((a.first, a.accepted), (1, 3));
    assert_eq!(s.next_seq(), 1);
    assert!(s.read_from(0, 10).unwrap().is_empty());
    s.commit().unwrap();
    assert_eq!(s.next_seq(), 4);
    assert_eq!(payloads(&s.read_from(0, 10).unwrap()), ["0", "1", "2"]);
}

#[test]
fn ack_compact_and_reopen_keep_exactly_the_unacknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let m = StoreMetrics::new();
    {
        let s = Store::open(&path, &StoreConfig::default(), m.clone()).unwrap();
        s.append(&recs(0..5)).unwrap();
        s.append(&recs(5..10)).unwrap();
        s.commit().unwrap();
        assert_eq!(s.records(), 10);
        // Out of order, as the bridge's lanes may acknowledge.
        s.ack(&[1, 3, 2, 7]);
        assert_eq!(s.records(), 6);
        assert_eq!(s.head(), Some(4));
        s.ack(&[4, 5]);
        // The first batch (1..=5) is fully acknowledged: compaction removes it.
        assert!(s.compact().unwrap());
        // The cursor and the removal are durable from the next checkpoint on.
        s.checkpoint().unwrap();
        assert_eq!(s.records(), 4);
        assert_eq!(
            payloads(&s.read_from(0, 100).unwrap()),
            ["5", "7", "8", "9"]
        );
    }
    let s = Store::open(&path, &StoreConfig::default(), m).unwrap();
    // Record 7 was acknowledged above the cursor: after a restart it is sent again
    // (at least once), never lost.
    assert_eq!(s.head(), Some(6));
    assert_eq!(s.next_seq(), 11);
    assert_eq!(
        payloads(&s.read_from(0, 100).unwrap()),
        ["5", "6", "7", "8", "9"]
    );
}

#[test]
fn disk_reads_and_tail_reads_agree() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let m = StoreMetrics::new();
    {
        let s = Store::open(&path, &StoreConfig::default(), m.clone()).unwrap();
        for i in 0..20 {
            s.append(&recs(i * 10..i * 10 + 10)).unwrap();
            s.commit().unwrap();
        }
    }
    let s = Store::open(&path, &StoreConfig::default(), m).unwrap();
    // Freshly opened: nothing in memory, everything from disk, from the middle of a batch.
    assert!(s.read_tail(57, 10).is_none());
    let disk = s.read_from(57, 30).unwrap();
    assert_eq!(disk.first().unwrap().0, 57);
    assert_eq!(disk.len(), 30);
    assert_eq!(payloads(&disk)[0], "56");
    s.append(&recs(200..205)).unwrap();
    s.commit().unwrap();
    let tail = s.read_tail(201, 10).unwrap();
    assert_eq!(payloads(&tail), ["200", "201", "202", "203", "204"]);
    let counts = s.topic_counts(1, s.next_seq()).unwrap();
    assert_eq!(counts.get("t"), Some(&205));
}

#[test]
fn retained_messages_survive_reopen_and_stay_out_of_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let m = StoreMetrics::new();
    {
        let s = Store::open(&path, &StoreConfig::default(), m.clone()).unwrap();
        s.retain("dev/1/status", 1, b"online").unwrap();
        s.retain("dev/2/status", 2, b"offline").unwrap();
        s.retain("dev/1/status", 0, b"online again").unwrap();
        s.retain("dev/3/status", 1, b"x").unwrap();
        s.retain("dev/3/status", 1, b"").unwrap();
        s.commit().unwrap();
        assert_eq!(s.records(), 0);
    }
    let s = Store::open(&path, &StoreConfig::default(), m).unwrap();
    assert_eq!(s.records(), 0);
    assert_eq!(s.retained_count(), 2);
    assert_eq!(
        s.retained().unwrap(),
        vec![
            ("dev/1/status".to_string(), 0, Bytes::from("online again")),
            ("dev/2/status".to_string(), 2, Bytes::from("offline")),
        ]
    );
}

/// A store whose budget holds `batches` batches of two records.
fn store_of(batches: u64, policy: FullPolicy) -> (tempfile::TempDir, Store, Arc<StoreMetrics>) {
    let dir = tempfile::tempdir().unwrap();
    let m = StoreMetrics::new();
    let one = KEY_BYTES + batch::HEADER as u64 + 2 * rec("t", 0).cost();
    let s = Store::open(
        &dir.path().join("q"),
        &cfg(one * batches, policy),
        m.clone(),
    )
    .unwrap();
    (dir, s, m)
}

#[test]
fn drop_oldest_evicts_whole_batches_and_counts_each_record() {
    let (_dir, s, m) = store_of(3, FullPolicy::DropOldest);
    for i in 0..5 {
        s.append(&recs(i * 2..i * 2 + 2)).unwrap();
    }
    s.commit().unwrap();
    assert_eq!(m.dropped(DropReason::QueueFull), 4);
    assert_eq!(s.records(), 6);
    assert_eq!(payloads(&s.read_from(0, 100).unwrap())[0], "4");
}

#[test]
fn reject_new_holds_back_until_acknowledgements_make_room() {
    let (_dir, s, m) = store_of(2, FullPolicy::RejectNew);
    s.append(&recs(0..2)).unwrap();
    s.append(&recs(2..4)).unwrap();
    s.commit().unwrap();
    assert!(matches!(s.append(&recs(4..6)), Err(StoreError::Full)));
    assert_eq!(s.records(), 4);
    s.ack(&[1, 2]);
    s.compact().unwrap();
    assert_eq!(s.append(&recs(4..6)).unwrap().accepted, 2);
    s.commit().unwrap();
    assert_eq!(
        payloads(&s.read_from(0, 100).unwrap()),
        ["2", "3", "4", "5"]
    );
    assert_eq!(m.dropped(DropReason::QueueFull), 0);
}

#[test]
fn expire_drops_old_batches() {
    let dir = tempfile::tempdir().unwrap();
    let m = StoreMetrics::new();
    let c = StoreConfig {
        max_age: Duration::from_secs(60),
        ..StoreConfig::default()
    };
    let s = Store::open(&dir.path().join("q"), &c, m.clone()).unwrap();
    let mut old = rec("t", 0);
    old.ts_ms -= 120_000;
    s.append(&[old]).unwrap();
    s.append(&[rec("t", 1)]).unwrap();
    s.commit().unwrap();
    assert_eq!(s.expire().unwrap(), 1);
    assert_eq!(s.records(), 1);
    assert_eq!(m.dropped(DropReason::Expired), 1);
}

#[test]
fn reopen_after_a_failed_commit_forgets_only_the_unconfirmed() {
    let (_dir, s) = fresh();
    s.append(&recs(0..3)).unwrap();
    s.commit().unwrap();
    s.append(&recs(3..6)).unwrap();
    // As if the commit had failed: reopen, and the journal appends the batch again.
    s.reopen().unwrap();
    assert_eq!(s.end(), 4);
    assert_eq!(s.append(&recs(3..6)).unwrap().first, 4);
    s.commit().unwrap();
    assert_eq!(
        payloads(&s.read_from(0, 100).unwrap()),
        ["0", "1", "2", "3", "4", "5"]
    );
}

#[test]
fn unopenable_store_is_salvaged_not_emptied() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let m = StoreMetrics::new();
    {
        let s = Store::open(&path, &StoreConfig::default(), m.clone()).unwrap();
        for i in 0..10 {
            s.append(&recs(i * 10..i * 10 + 10)).unwrap();
            s.commit().unwrap();
        }
        s.ack(&(1..=15).collect::<Vec<_>>());
        s.compact().unwrap();
        s.checkpoint().unwrap();
        s.save_mark();
    }
    // Make sled refuse it: a config file it cannot parse.
    std::fs::write(path.join("conf"), b"this is not a sled config").unwrap();
    let m2 = StoreMetrics::new();
    let s = Store::open(&path, &StoreConfig::default(), m2.clone()).unwrap();
    assert_eq!(m2.store_quarantined.get(), 1);
    let got = s.read_from(0, 1000).unwrap();
    assert_eq!(got.first().unwrap().0, 16);
    assert_eq!(got.len(), 85, "every unacknowledged record salvaged");
    assert_eq!(s.next_seq(), 101);
    let moved = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("q.damaged-"));
    assert!(moved);
}

#[test]
fn a_mark_ahead_of_the_store_counts_the_lost_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    {
        let s = Store::open(&path, &StoreConfig::default(), StoreMetrics::new()).unwrap();
        s.append(&recs(0..10)).unwrap();
        s.commit().unwrap();
    }
    // The mark says 30 records were durable; the store holds 10.
    mark::Mark { end: 31, cursor: 0 }.save(&path);
    let m = StoreMetrics::new();
    let s = Store::open(&path, &StoreConfig::default(), m.clone()).unwrap();
    assert_eq!(m.dropped(DropReason::Corrupt), 20);
    assert_eq!(s.records(), 10);
    // Sequence numbers are never reused.
    assert_eq!(s.end(), 31);
}

#[test]
fn a_store_in_use_is_refused_not_salvaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let s = Store::open(&path, &StoreConfig::default(), StoreMetrics::new()).unwrap();
    s.append(&recs(0..3)).unwrap();
    s.commit().unwrap();
    // A second opener (another gateway on the same data_dir) must not take the store away.
    let m = StoreMetrics::new();
    let err = match Store::open(&path, &StoreConfig::default(), m.clone()) {
        Ok(_) => panic!("a second open of a store in use succeeded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("in use"), "{err}");
    assert_eq!(m.store_quarantined.get(), 0);
    let moved = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("q.damaged-"));
    assert!(!moved, "the live store was moved aside");
    assert_eq!(payloads(&s.read_from(0, 10).unwrap()), ["0", "1", "2"]);
}

#[test]
fn commits_survive_a_crash_before_any_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let copy = dir.path().join("crashed");
    let s = Store::open(&path, &StoreConfig::default(), StoreMetrics::new()).unwrap();
    s.checkpoint().unwrap();
    s.retain("dev/1/status", 1, b"online").unwrap();
    s.append(&recs(0..4)).unwrap();
    s.commit().unwrap();
    s.append(&recs(4..6)).unwrap();
    s.commit().unwrap();
    // Not committed: never acknowledged, may or may not come back.
    s.append(&recs(6..7)).unwrap();
    crash_copy(&path, &copy);
    let m = StoreMetrics::new();
    let r = Store::open(&copy, &StoreConfig::default(), m.clone()).unwrap();
    let got = payloads(&r.read_from(0, 100).unwrap());
    assert_eq!(got[..6], ["0", "1", "2", "3", "4", "5"]);
    assert_eq!(r.retained_count(), 1);
    assert_eq!(m.dropped(DropReason::Corrupt), 0);
    drop(s);
}

/// Copies the store's files as a crash would leave them (sled not flushed since the last
/// checkpoint) into `to`.
fn crash_copy(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn a_crash_keeps_the_cursor_of_the_last_commit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let s = Store::open(&path, &StoreConfig::default(), StoreMetrics::new()).unwrap();
    s.append(&recs(0..10)).unwrap();
    s.commit().unwrap();
    s.ack(&[1, 2, 3]);
    s.checkpoint().unwrap();
    // Acknowledged after the checkpoint; the next commit carries the cursor.
    s.ack(&[4, 5]);
    s.append(&recs(10..12)).unwrap();
    s.commit().unwrap();
    let copy = dir.path().join("crashed");
    crash_copy(&path, &copy);
    let r = Store::open(&copy, &StoreConfig::default(), StoreMetrics::new()).unwrap();
    let got = payloads(&r.read_from(0, 100).unwrap());
    assert_eq!(got, ["5", "6", "7", "8", "9", "10", "11"]);
    // And the recovery's own checkpoint made it durable: a second crash keeps it too.
    let again = dir.path().join("again");
    crash_copy(&copy, &again);
    drop(r);
    let r = Store::open(&again, &StoreConfig::default(), StoreMetrics::new()).unwrap();
    assert_eq!(payloads(&r.read_from(0, 100).unwrap())[0], "5");
    drop(s);
}

#[test]
fn a_large_commit_is_stored_as_small_values_and_compacts_by_value() {
    let (_dir, s) = fresh();
    let big: Vec<Record> = (0..300u32)
        .map(|i| Record {
            payload: Bytes::from(format!("{i:0>100}")),
            ..rec("dev/big", i)
        })
        .collect();
    s.append(&big).unwrap();
    s.commit().unwrap();
    let values = s.with_trees(|t| Ok(t.db.len())).unwrap();
    assert!(values >= 4, "300 records of ~130 B in {values} values");
    let sizes: Vec<usize> = s
        .with_trees(|t| Ok(t.db.iter().map(|kv| kv.unwrap().1.len()).collect()))
        .unwrap();
    assert!(sizes
        .iter()
        .all(|n| *n as u64 <= VALUE_BYTES + batch::HEADER as u64));
    // Acknowledging the first 100 removes the values they fill completely, no more.
    s.ack(&(1..=100).collect::<Vec<_>>());
    assert!(s.compact().unwrap());
    let left = s.with_trees(|t| Ok(t.db.len())).unwrap();
    assert!(left < values && left >= values - 2);
    let got = s.read_from(0, 1000).unwrap();
    assert_eq!(got.len(), 200);
    assert_eq!(got[0].0, 101);
    assert!(got.windows(2).all(|w| w[1].0 == w[0].0 + 1));
    assert_eq!(s.records(), 200);
}

#[test]
fn value_chunks_keep_every_record_in_order() {
    let mk = |n: usize| Record {
        payload: Bytes::from(vec![b'x'; n]),
        ..rec("t", 0)
    };
    // One record larger than a value goes alone; small ones are grouped.
    let rs = vec![mk(10), mk(20_000), mk(10), mk(10), mk(9_000), mk(1)];
    let chunks = value_chunks(&rs);
    assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), rs.len());
    assert_eq!(
        chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
        [1, 1, 2, 1, 1]
    );
    assert_eq!(value_chunks(&rs[..1]).len(), 1);
}

#[test]
fn a_dead_letter_leaves_the_queue_is_kept_across_a_reopen_and_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q");
    let c = StoreConfig {
        max_dead_letters: 2,
        ..StoreConfig::default()
    };
    let m = StoreMetrics::new();
    let s = Store::open(&path, &c, m.clone()).unwrap();
    s.append(&recs(0..5)).unwrap();
    s.commit().unwrap();
    let d = s.dead_letter(2, 0x87).unwrap().unwrap();
    assert_eq!(
        (d.seq, d.topic.as_str(), d.size, d.reason),
        (2, "t", 1, 0x87)
    );
    // Off the queue, not counted as delivered; the records behind it are still there.
    assert_eq!(s.records(), 4);
    assert_eq!(m.messages_out.get(), 0);
    assert_eq!(payloads(&s.read_from(0, 10).unwrap()), ["0", "2", "3", "4"]);
    // A record no longer queued makes none.
    s.ack(&[1]);
    assert_eq!(s.dead_letter(1, 0x87).unwrap(), None);
    s.dead_letter(4, 0x90).unwrap().unwrap();
    assert_eq!(s.dead_letter_count(), 2);
    // A third pushes the oldest out, counted.
    s.dead_letter(5, 0x99).unwrap().unwrap();
    let kept: Vec<(u64, u8)> = s
        .dead_letters(0, 10)
        .unwrap()
        .iter()
        .map(|d| (d.seq, d.reason))
        .collect();
    assert_eq!(kept, [(4, 0x90), (5, 0x99)]);
    assert_eq!(m.dropped(DropReason::DeadLettersFull), 1);
    assert_eq!((m.dead_letters(0x87), m.dead_letters(0x99)), (1, 1));
    assert_eq!(m.dead_letters_kept.get(), 2);
    // Paged by sequence number.
    assert_eq!(s.dead_letters(4, 10).unwrap().len(), 1);
    s.checkpoint().unwrap();
    drop(s);
    let s = Store::open(&path, &c, StoreMetrics::new()).unwrap();
    assert_eq!(s.dead_letter_count(), 2);
    let (d, payload) = s.dead_letter_payload(5).unwrap().unwrap();
    assert_eq!((d.topic.as_str(), &payload[..]), ("t", &b"4"[..]));
    // The cursor persists what is acknowledged below it only: record 5 (above 3 and 4) is
    // queued again, as any record acknowledged out of order; refused again, it is kept under
    // the same key, once.
    assert_eq!(payloads(&s.read_from(0, 10).unwrap()), ["2", "3", "4"]);
    s.dead_letter(5, 0x99).unwrap().unwrap();
    assert_eq!(s.dead_letter_count(), 2);
    assert!(s.drop_dead_letter(5).unwrap());
    assert!(!s.drop_dead_letter(5).unwrap());
    assert_eq!(s.dead_letter_count(), 1);
}
