//! A snapshot as it travels between replicas: every row of the application's column families
//! at one moment, after a header, streamed through a file so that neither the replica that sends
//! it nor the one that installs it ever holds it whole in memory.
//!
//! Format: the magic bytes, the last applied leader timestamp (8 bytes, big-endian), then one
//! frame per row — the family's position in `App::COLUMN_FAMILIES` (one byte), the key's length
//! (4 bytes, big-endian), the key, the value's length, the value — then [`END`].

use std::io::{Read, Write};

use crate::Error;
use crate::app::AppView;

const MAGIC: &[u8; 8] = b"wsnap\0\0\x01";
/// Where a family's position would be: no more rows.
const END: u8 = u8::MAX;

/// Writes the snapshot of `families` as `view` holds them.
pub(crate) fn write(
    view: &AppView<'_>,
    families: &[&str],
    last_timestamp_ms: i64,
    out: &mut impl Write,
) -> Result<(), Error> {
    let mut writer = Writer::new(out, last_timestamp_ms)?;
    for (position, family) in families.iter().enumerate() {
        let position = u8::try_from(position)
            .ok()
            .filter(|position| *position != END)
            .expect("a family's position fits in a byte");
        let mut failure = None;
        view.for_each_in(family, &[], None, |key, value| {
            if failure.is_none() {
                failure = writer.row(position, key, value).err();
            }
        })?;
        if let Some(error) = failure {
            return Err(error.into());
        }
    }
    writer.finish()?;
    Ok(())
}

/// Writes a snapshot row by row.
pub struct Writer<'a, W: Write> {
    out: &'a mut W,
}

impl<'a, W: Write> Writer<'a, W> {
    pub fn new(out: &'a mut W, last_timestamp_ms: i64) -> std::io::Result<Writer<'a, W>> {
        out.write_all(MAGIC)?;
        out.write_all(&last_timestamp_ms.to_be_bytes())?;
        Ok(Writer { out })
    }

    /// A row of the family at `family` in the application's `COLUMN_FAMILIES`.
    pub fn row(&mut self, family: u8, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        self.out.write_all(&[family])?;
        for bytes in [key, value] {
            let length = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
            self.out.write_all(&length.to_be_bytes())?;
            self.out.write_all(bytes)?;
        }
        Ok(())
    }

    pub fn finish(self) -> std::io::Result<()> {
        self.out.write_all(&[END])
    }
}

/// Reads a snapshot of `families`: returns its last applied leader timestamp, after handing
/// `row` every row in order (the family's name, the key, the value). A snapshot that is cut
/// short, names a family beyond `families` or lacks the magic bytes is corrupt.
pub fn read(
    input: &mut impl Read,
    families: &[&str],
    mut row: impl FnMut(&str, &[u8], &[u8]) -> Result<(), Error>,
) -> Result<i64, Error> {
    let mut magic = [0; 8];
    read_exact(input, &mut magic)?;
    if &magic != MAGIC {
        return Err(corrupt("it does not begin as a snapshot"));
    }
    let mut timestamp = [0; 8];
    read_exact(input, &mut timestamp)?;
    let (mut key, mut value) = (Vec::new(), Vec::new());
    loop {
        let mut position = [0];
        read_exact(input, &mut position)?;
        if position[0] == END {
            return Ok(i64::from_be_bytes(timestamp));
        }
        let family = families
            .get(usize::from(position[0]))
            .ok_or_else(|| corrupt("a row names an unknown family"))?;
        read_field(input, &mut key)?;
        read_field(input, &mut value)?;
        row(family, &key, &value)?;
    }
}

fn read_field(input: &mut impl Read, field: &mut Vec<u8>) -> Result<(), Error> {
    let mut length = [0; 4];
    read_exact(input, &mut length)?;
    let length = u32::from_be_bytes(length) as usize;
    field.clear();
    // Read through `take`, so a corrupt length cannot make this allocate more than is there.
    let read = input.take(length as u64).read_to_end(field)?;
    if read < length {
        return Err(corrupt("it is cut short"));
    }
    Ok(())
}

fn read_exact(input: &mut impl Read, buffer: &mut [u8]) -> Result<(), Error> {
    input
        .read_exact(buffer)
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::UnexpectedEof => corrupt("it is cut short"),
            _ => error.into(),
        })
}

fn corrupt(why: &str) -> Error {
    Error::Corrupt(format!("a snapshot: {why}"))
}
