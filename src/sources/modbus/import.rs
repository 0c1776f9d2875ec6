//! `fieldgate modbus import tags.csv`: the tag list a vendor ships as CSV, as
//! `[[modbus.tags]]` tables to paste under a `[[modbus]]` device.
//!
//! Owns the CSV reading (RFC 4180 quoting; `,`, `;` or tab, whichever the header line uses;
//! with `;` or tab a decimal comma is read as a point) and the mapping of vendor column names
//! and spellings onto tag keys. Every row goes through the same deserialisation and
//! validation as the configuration file, so what is printed is a valid tag list, or the
//! command fails naming the line and column of each problem.
//!
//! Columns (header row first; names are matched without case, spaces, `_` or `-`):
//! - `name` (also `tag`, `tagname`) and `address` (also `register`, `addr`): required;
//! - `kind` (also `registertype`, `table`): `coil`, `discrete_input`, `input_register`,
//!   `holding_register` (or `holding`, `input`, `coils`, `discrete`). Without it, a 5- or
//!   6-digit address in the classic numbering sets the kind and becomes a protocol address:
//!   `40001`/`400001` holding register 0, `30001` input register 0, `10001` discrete input 0,
//!   `00001` coil 0 (a device with `address_base = 0`, the default);
//! - `type` (also `datatype`): the config spellings, and the common vendor ones (`float32`,
//!   `real`, `int16`, `word`, `dword`, `double`, ...);
//! - `order` (also `byteorder`, `wordorder`, `endian`): `ABCD`... or `big`/`little`;
//! - `scale` (also `scalefactor`, `multiplier`, `factor`), `offset`, `unit` (also `units`),
//!   `decimals`, `bit`, `length`, `count`, `writable`, `deadband`, `on_change`,
//!   `poll_interval` by their own names;
//! - `description`, `comment`, `notes`: ignored. Any other column is an error (a typo must
//!   not silently drop a setting).
//!
//! Invariants: empty cells are left out (the tag default applies); the output holds only
//! keys that differ from the defaults.

use std::fmt::Write as _;

use super::config::{validate, ModbusDeviceConfig, TagConfig};

/// Columns that carry no tag setting.
const IGNORED: [&str; 3] = ["description", "comment", "notes"];

/// Why an import failed: every problem found, each naming its line (and column).
#[derive(Debug)]
pub struct ImportError(pub Vec<String>);

impl std::fmt::Display for ImportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} problem(s) in the tag list:", self.0.len())?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ImportError {}

/// Splits CSV text into rows of fields (with the line each row starts on), with `sep` as the
/// separator: quoted fields may hold separators, doubled quotes and line breaks.
fn rows(text: &str, sep: char) -> Result<Vec<(usize, Vec<String>)>, String> {
    let mut out = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let (mut line, mut start) = (1, 1);
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => {
                if c == '\n' {
                    line += 1;
                }
                field.push(c);
            }
            (false, '"') if field.is_empty() => quoted = true,
            (false, c) if c == sep => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                out.push((start, std::mem::take(&mut row)));
                line += 1;
                start = line;
            }
            (false, c) => field.push(c),
        }
    }
    if quoted {
        return Err(format!("line {start}: a quoted field is not closed"));
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        out.push((start, row));
    }
    // Blank lines carry nothing.
    out.retain(|(_, r)| r.iter().any(|f| !f.trim().is_empty()));
    Ok(out)
}

/// The tag key a header names, or None for a column to ignore.
fn key(header: &str) -> Result<Option<&'static str>, String> {
    let h: String = header
        .chars()
        .filter(|c| !matches!(c, ' ' | '_' | '-'))
        .flat_map(char::to_lowercase)
        .collect();
    let k = match h.as_str() {
        "name" | "tag" | "tagname" => "name",
        "address" | "register" | "addr" | "registeraddress" => "address",
        "kind" | "registertype" | "table" => "kind",
        "type" | "datatype" => "type",
        "order" | "byteorder" | "wordorder" | "endian" | "endianness" => "order",
        "scale" | "scalefactor" | "multiplier" | "factor" => "scale",
        "offset" => "offset",
        "unit" | "units" | "engineeringunit" => "unit",
        "bit" => "bit",
        "length" | "len" => "length",
        "writable" | "write" | "rw" => "writable",
        "deadband" => "deadband",
        "onchange" => "on_change",
        "pollinterval" | "poll" => "poll_interval",
        "decimals" => "decimals",
        "count" | "coils" => "count",
        other if IGNORED.contains(&other) => return Ok(None),
        _ => {
            return Err(format!(
                "column {header:?} is not a tag setting; known columns: name, address, kind, \
                 type, order, scale, offset, unit, decimals, bit, length, count, writable, \
                 deadband, on_change, poll_interval (description, comment and notes are \
                 ignored)"
            ))
        }
    };
    Ok(Some(k))
}

/// A vendor spelling of a data type, in the config's spelling.
fn data_type(v: &str) -> String {
    let l = v.trim().to_ascii_lowercase().replace([' ', '_', '-'], "");
    match l.as_str() {
        "float" | "float32" | "real" | "single" | "ieee754" => "f32",
        "double" | "float64" | "lreal" => "f64",
        "int16" | "short" | "int" | "sint16" => "i16",
        "uint16" | "word" | "ushort" | "unsigned16" => "u16",
        "int32" | "dint" | "long" | "sint32" => "i32",
        "uint32" | "dword" | "udint" | "ulong" | "unsigned32" => "u32",
        "int64" | "lint" => "i64",
        "uint64" | "lword" | "ulint" => "u64",
        "boolean" | "bool" | "coil" => "bool",
        "string" | "char" | "ascii" | "text" => "string",
        _ => return v.trim().to_string(),
    }
    .to_string()
}

/// A vendor spelling of a byte order.
fn order(v: &str) -> String {
    match v.trim().to_ascii_lowercase().as_str() {
        "big" | "bigendian" | "big endian" | "be" => "ABCD".into(),
        "little" | "littleendian" | "little endian" | "le" => "DCBA".into(),
        _ => v.trim().to_ascii_uppercase(),
    }
}

/// A classic 5/6-digit Modbus address (`40001`): its kind and protocol address.
fn classic(address: &str) -> Option<(&'static str, u32)> {
    let a = address.trim();
    if !(a.len() == 5 || a.len() == 6) || !a.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let kind = match a.as_bytes()[0] {
        b'0' => "coil",
        b'1' => "discrete_input",
        b'3' => "input_register",
        b'4' => "holding_register",
        _ => return None,
    };
    let n: u32 = a[1..].parse().ok()?;
    Some((kind, n.checked_sub(1)?))
}

/// A cell as a TOML value of the type the key takes (numbers and booleans parsed; a decimal
/// comma read as a point when `comma_decimals`).
fn value(key: &str, cell: &str, comma_decimals: bool) -> Result<toml::Value, String> {
    let c = cell.trim();
    let number = || {
        if comma_decimals {
            c.replace(',', ".")
        } else {
            c.to_string()
        }
    };
    Ok(match key {
        "name" | "kind" | "unit" | "poll_interval" => toml::Value::String(c.to_string()),
        "type" => toml::Value::String(data_type(c)),
        "order" => toml::Value::String(order(c)),
        "address" | "bit" | "length" | "decimals" | "count" => toml::Value::Integer(
            c.parse()
                .map_err(|_| format!("{c:?} is not a whole number"))?,
        ),
        "scale" | "offset" | "deadband" => toml::Value::Float(
            number()
                .parse()
                .map_err(|_| format!("{c:?} is not a number"))?,
        ),
        "writable" | "on_change" => toml::Value::Boolean(match c.to_ascii_lowercase().as_str() {
            "true" | "yes" | "y" | "1" | "x" | "rw" | "w" => true,
            "false" | "no" | "n" | "0" | "" | "r" | "ro" => false,
            _ => return Err(format!("{c:?} is not yes/no")),
        }),
        _ => toml::Value::String(c.to_string()),
    })
}

/// The separator the header line uses.
fn separator(text: &str) -> char {
    let header = text.lines().next().unwrap_or("");
    [';', '\t', ',']
        .into_iter()
        .max_by_key(|s| header.matches(*s).count())
        .filter(|s| header.contains(*s))
        .unwrap_or(',')
}

/// Reads the CSV `text` into tags, validated as a device's tag list would be.
pub fn tags(text: &str) -> Result<Vec<TagConfig>, ImportError> {
    let sep = separator(text);
    let rows = rows(text, sep).map_err(|e| ImportError(vec![e]))?;
    let mut rows = rows.into_iter();
    let Some((_, header)) = rows.next() else {
        return Err(ImportError(vec![
            "the file is empty; the first line must name the columns".into(),
        ]));
    };
    let mut problems = Vec::new();
    let keys: Vec<Option<&'static str>> = header
        .iter()
        .map(|h| {
            key(h).unwrap_or_else(|e| {
                problems.push(format!("line 1: {e}"));
                None
            })
        })
        .collect();
    for need in ["name", "address"] {
        if !keys.contains(&Some(need)) {
            problems.push(format!("line 1: no {need:?} column"));
        }
    }
    if !problems.is_empty() {
        return Err(ImportError(problems));
    }
    let mut tags = Vec::new();
    let mut lines = Vec::new();
    for (line, row) in rows {
        let mut t = toml::Table::new();
        let mut ok = true;
        for (i, cell) in row.iter().enumerate() {
            let Some(Some(k)) = keys.get(i) else { continue };
            if cell.trim().is_empty() {
                continue;
            }
            match value(k, cell, sep != ',') {
                Ok(v) => {
                    t.insert(k.to_string(), v);
                }
                Err(e) => {
                    problems.push(format!("line {line}, column {:?}: {e}", header[i]));
                    ok = false;
                }
            }
        }
        if !t.contains_key("kind") {
            let address = row
                .get(keys.iter().position(|k| *k == Some("address")).unwrap_or(0))
                .map(String::as_str)
                .unwrap_or("");
            if let Some((kind, a)) = classic(address) {
                t.insert("kind".into(), toml::Value::String(kind.into()));
                t.insert("address".into(), toml::Value::Integer(a.into()));
            }
        }
        if !ok {
            continue;
        }
        match toml::Value::Table(t).try_into::<TagConfig>() {
            Ok(tag) => {
                tags.push(tag);
                lines.push(line);
            }
            Err(e) => problems.push(format!("line {line}: {}", e.message())),
        }
    }
    // The checks of the configuration file, on a device holding these tags.
    let device = ModbusDeviceConfig {
        name: "import".into(),
        host: "127.0.0.1:502".into(),
        tags: tags.clone(),
        ..ModbusDeviceConfig::default()
    };
    for p in validate(&[device], "import") {
        // Key "modbus[0].tags[N].key" -> the line of tag N.
        let line = p
            .key
            .strip_prefix("modbus[0].tags[")
            .and_then(|r| r.split_once(']'))
            .and_then(|(n, rest)| Some((lines.get(n.parse::<usize>().ok()?)?, rest)));
        problems.push(match line {
            Some((line, "")) => format!("line {line}: {}", p.message),
            Some((line, rest)) => {
                format!(
                    "line {line}: {}: {}",
                    rest.trim_start_matches('.'),
                    p.message
                )
            }
            None => p.to_string(),
        });
    }
    if problems.is_empty() {
        Ok(tags)
    } else {
        Err(ImportError(problems))
    }
}

/// The tags as `[[modbus.tags]]` tables, each with only the keys that differ from the
/// defaults.
pub fn to_toml(tags: &[TagConfig]) -> String {
    let defaults = toml::Value::try_from(TagConfig::default())
        .ok()
        .and_then(|v| v.as_table().cloned())
        .unwrap_or_default();
    let mut out = String::new();
    for t in tags {
        let Ok(toml::Value::Table(mut table)) = toml::Value::try_from(t) else {
            continue;
        };
        table.retain(|k, v| k == "address" || defaults.get(k) != Some(v));
        // The name first, to find a tag by eye; the rest in key order.
        let name = table
            .remove("name")
            .map(|n| toml::Table::from_iter([("name".to_string(), n)]));
        let head = name.map(|n| toml::to_string(&n).unwrap_or_default());
        let body = toml::to_string(&table).unwrap_or_default();
        let _ = write!(out, "[[modbus.tags]]\n{}{body}\n", head.unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_fields_separators_and_blank_lines() {
        let r = rows("a;\"b;c\";\"say \"\"hi\"\"\"\r\n\n1;2;\"x\ny\"\n", ';').unwrap();
        assert_eq!(
            r,
            [
                (1, vec!["a".into(), "b;c".into(), "say \"hi\"".into()]),
                (3, vec!["1".into(), "2".into(), "x\ny".into()]),
            ]
        );
        assert!(rows("a,\"b\n", ',').is_err());
    }

    #[test]
    fn classic_addresses_give_kind_and_protocol_address() {
        assert_eq!(classic("40001"), Some(("holding_register", 0)));
        assert_eq!(classic("400010"), Some(("holding_register", 9)));
        assert_eq!(classic("30002"), Some(("input_register", 1)));
        assert_eq!(classic("10001"), Some(("discrete_input", 0)));
        assert_eq!(classic("00003"), Some(("coil", 2)));
        assert_eq!(classic("40000"), None);
        assert_eq!(classic("123"), None);
        assert_eq!(classic("20001"), None);
    }

    #[test]
    fn a_vendor_list_becomes_valid_tags() {
        let csv = "Tag Name;Register;Data Type;Byte Order;Scale Factor;Units;Description\n\
                   power;40001;FLOAT32;CDAB;0,1;kW;\"total; all phases\"\n\
                   state;00001;;;;;\n\
                   temp;30011;int16;big;0,01;degC;\n";
        let t = tags(csv).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].name, "power");
        assert_eq!(t[0].address, 0);
        assert_eq!(t[0].scale, 0.1);
        assert_eq!(t[0].unit, "kW");
        assert_eq!(t[1].kind.as_str(), "coil");
        assert_eq!(t[2].kind.as_str(), "input_register");
        assert_eq!(t[2].address, 10);
        let text = to_toml(&t);
        assert!(text.contains("[[modbus.tags]]\nname = \"power\""), "{text}");
        assert!(!text.contains("offset"), "defaults are left out:\n{text}");
    }

    #[test]
    fn problems_name_the_line_and_column() {
        let csv = "name,address,type,colour\nok,40001,u16,red\n";
        let e = tags(csv).unwrap_err().to_string();
        assert!(e.contains("line 1: column \"colour\""), "{e}");
        let csv = "name,address,scale,type\na,40001,fast,u16\nb,40002,1,nonsense\nb,40003,1,u16\n";
        let e = tags(csv).unwrap_err().0;
        assert!(
            e.iter().any(|p| p.starts_with("line 2, column \"scale\"")),
            "{e:?}"
        );
        assert!(e.iter().any(|p| p.starts_with("line 3:")), "{e:?}");
        assert!(tags("").is_err());
        assert!(tags("address\n1\n").unwrap_err().0[0].contains("no \"name\" column"));
    }
}
