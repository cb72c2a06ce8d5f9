//! Field and enum numbers are never reused. `proto/compat/wire.lock` records every field (number,
//! name, label, type, and `presence` for a proto3 `optional` field or `oneof NAME` for a member
//! of a oneof) and enum value ever released; this test fails when one of them changed,
//! or disappeared without its number being `reserved`, and when a new one is not recorded yet.
//! Record new ones with `WEFT_PROTO_LOCK=add cargo test -p weft-proto --test wire_compat`: that
//! only appends lines, so a change to a recorded one is a deliberate edit of the file, seen in
//! review.

use std::collections::BTreeMap;
use std::path::PathBuf;

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet};

/// What one line of the lock says: its kind and scope (`field weft.v1.Record`), its number, and
/// the rest (name, label, type).
type Entries = BTreeMap<(String, i32), String>;

/// A scope's reserved numbers: message ranges are end-exclusive, enum ranges end-inclusive.
#[derive(Default)]
struct Reserved(Vec<(i32, i32)>);

impl Reserved {
    fn contains(&self, number: i32) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&number))
    }
}

fn lock_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("compat/wire.lock")
}

fn walk_enum(
    scope: &str,
    e: &EnumDescriptorProto,
    out: &mut Entries,
    reserved: &mut BTreeMap<String, Reserved>,
) {
    let scope = format!("enum {scope}.{}", e.name());
    for value in &e.value {
        out.insert((scope.clone(), value.number()), value.name().to_string());
    }
    reserved
        .entry(scope)
        .or_default()
        .0
        .extend(e.reserved_range.iter().map(|r| (r.start(), r.end())));
}

fn walk_message(
    scope: &str,
    m: &DescriptorProto,
    out: &mut Entries,
    reserved: &mut BTreeMap<String, Reserved>,
) {
    let full = format!("{scope}.{}", m.name());
    let key = format!("field {full}");
    for field in &m.field {
        let mut what = format!("{} {:?} {:?}", field.name(), field.label(), field.r#type());
        if !field.type_name().is_empty() {
            what.push(' ');
            what.push_str(field.type_name());
        }
        // Presence and oneof membership are part of the contract too: a field that leaves or
        // joins a oneof, or gains or loses `optional`, changes what generated code reads.
        if field.proto3_optional() {
            what.push_str(" presence");
        } else if let Some(oneof) = field
            .oneof_index
            .and_then(|i| m.oneof_decl.get(usize::try_from(i).ok()?))
        {
            what.push_str(" oneof ");
            what.push_str(oneof.name());
        }
        out.insert((key.clone(), field.number()), what);
    }
    reserved
        .entry(key)
        .or_default()
        .0
        .extend(m.reserved_range.iter().map(|r| (r.start(), r.end() - 1)));
    for nested in &m.nested_type {
        walk_message(&full, nested, out, reserved);
    }
    for e in &m.enum_type {
        walk_enum(&full, e, out, reserved);
    }
}

/// Every field and enum value of our `.proto` files as they are now, with reserved numbers.
fn current() -> (Entries, BTreeMap<String, Reserved>) {
    let set = FileDescriptorSet::decode(weft_proto::FILE_DESCRIPTOR_SET).expect("descriptors");
    let mut out = Entries::new();
    let mut reserved = BTreeMap::new();
    for file in set.file.iter().filter(|f| f.name().starts_with("weft/")) {
        for m in &file.message_type {
            walk_message(file.package(), m, &mut out, &mut reserved);
        }
        for e in &file.enum_type {
            walk_enum(file.package(), e, &mut out, &mut reserved);
        }
    }
    (out, reserved)
}

fn line(((scope, number), what): (&(String, i32), &String)) -> String {
    format!("{scope} {number} {what}")
}

fn parse(text: &str) -> Entries {
    let mut out = Entries::new();
    for (i, l) in text.lines().enumerate() {
        if l.trim().is_empty() || l.starts_with('#') {
            continue;
        }
        let mut words = l.splitn(4, ' ');
        let (Some(kind), Some(scope), Some(number), Some(what)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            panic!(
                "wire.lock line {}: {l:?} is not `KIND SCOPE NUMBER WHAT`",
                i + 1
            );
        };
        let number: i32 = number
            .parse()
            .unwrap_or_else(|_| panic!("wire.lock line {}: bad number in {l:?}", i + 1));
        let previous = out.insert((format!("{kind} {scope}"), number), what.to_string());
        assert!(previous.is_none(), "wire.lock line {}: {l:?} twice", i + 1);
    }
    out
}

/// What `now` broke of what `locked` recorded.
fn broken(locked: &Entries, now: &Entries, reserved: &BTreeMap<String, Reserved>) -> Vec<String> {
    let mut broken = Vec::new();
    for (key, what) in locked {
        match now.get(key) {
            Some(current) if current == what => {}
            Some(current) => broken.push(format!(
                "{} {}: was `{what}`, is `{current}` (a number keeps its name and type for ever)",
                key.0, key.1
            )),
            None if reserved.get(&key.0).is_some_and(|r| r.contains(key.1)) => {}
            None => broken.push(format!(
                "{} {} (`{what}`) is gone but its number is not reserved",
                key.0, key.1
            )),
        }
    }
    broken
}

/// What `now` has that `locked` does not record yet, as lock lines.
fn unrecorded(locked: &Entries, now: &Entries) -> Vec<String> {
    now.iter()
        .filter(|(key, _)| !locked.contains_key(*key))
        .map(line)
        .collect()
}

#[test]
fn released_field_and_enum_numbers_are_never_reused() {
    let (now, reserved) = current();
    let text = std::fs::read_to_string(lock_path()).expect("proto/compat/wire.lock");
    let locked = parse(&text);
    let broken = broken(&locked, &now, &reserved);
    assert!(
        broken.is_empty(),
        "incompatible wire changes:\n{}",
        broken.join("\n")
    );
    let new = unrecorded(&locked, &now);
    if new.is_empty() {
        return;
    }
    if std::env::var("WEFT_PROTO_LOCK").as_deref() == Ok("add") {
        let mut text = text;
        for l in &new {
            text.push_str(l);
            text.push('\n');
        }
        std::fs::write(lock_path(), text).expect("append to wire.lock");
        return;
    }
    panic!(
        "{} fields or enum values are not in proto/compat/wire.lock; record them with \
         `WEFT_PROTO_LOCK=add cargo test -p weft-proto --test wire_compat`:\n{}",
        new.len(),
        new.join("\n")
    );
}

/// The check itself, on the real descriptors changed the ways a careless edit would: a field
/// that changes type or name, one removed without reserving its number, and a new one are each
/// caught; one removed with its number reserved is not.
#[test]
fn the_check_catches_what_it_should() {
    let (locked, reserved) = current();
    assert!(broken(&locked, &locked, &reserved).is_empty());
    assert!(unrecorded(&locked, &locked).is_empty());
    let scope = "field weft.v1.PublishRequest".to_string();
    let topic = (scope.clone(), 1);
    assert!(locked[&topic].starts_with("topic "), "{}", locked[&topic]);

    let mut retyped = locked.clone();
    retyped.insert(topic.clone(), "topic Optional TypeBytes".into());
    assert_eq!(broken(&locked, &retyped, &reserved).len(), 1);

    let mut renamed = locked.clone();
    renamed.insert(topic.clone(), locked[&topic].replacen("topic", "name", 1));
    assert_eq!(broken(&locked, &renamed, &reserved).len(), 1);

    let mut removed = locked.clone();
    removed.remove(&topic);
    assert_eq!(broken(&locked, &removed, &reserved).len(), 1);
    let mut with_reservation = BTreeMap::new();
    with_reservation.insert(scope.clone(), Reserved(vec![(1, 1)]));
    assert!(broken(&locked, &removed, &with_reservation).is_empty());

    // Oneof membership and explicit presence are recorded, so leaving a oneof is a change.
    let partition = (scope.clone(), 2);
    assert!(
        locked[&partition].ends_with(" oneof target"),
        "{}",
        locked[&partition]
    );
    let mut left_oneof = locked.clone();
    left_oneof.insert(
        partition.clone(),
        locked[&partition].replace(" oneof target", ""),
    );
    assert_eq!(broken(&locked, &left_oneof, &reserved).len(), 1);
    let timestamp = ("field weft.v1.GetOffsetsRequest".to_string(), 4);
    assert!(
        locked[&timestamp].ends_with(" presence"),
        "{}",
        locked[&timestamp]
    );

    let mut added = locked.clone();
    added.insert((scope, 4000), "extra Optional TypeString".into());
    assert_eq!(
        unrecorded(&locked, &added),
        ["field weft.v1.PublishRequest 4000 extra Optional TypeString"]
    );
}
