//! The Raft log as format versions 0 to 4 kept it: a redb database
//! (`raft.redb`). Read once, to migrate it into segment files; then marked
//! [`MOVED`] so that an older blixard refuses the data dir (naming the
//! version) instead of starting on what would look like an empty log.
use std::collections::BTreeMap;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::super::{Entry, LogId, Vote};
use super::segment::Marks;
use crate::codec;
use crate::format::{self, FormatError};

/// The legacy database's file name, in the data dir.
pub const FILE: &str = "raft.redb";
/// The `format` a migrated database is left with: newer than any build that
/// read redb logs, so such a build refuses it.
pub const MOVED: u16 = u16::MAX;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";
const KEY_FORMAT: &str = "format";

/// Why the legacy log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error(transparent)]
    Db(#[from] redb::Error),
    #[error(transparent)]
    Format(#[from] FormatError),
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for LegacyError {
            fn from(e: $t) -> Self {
                LegacyError::Db(e.into())
            }
        }
    )*};
}
redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// What a legacy database held.
pub struct Contents {
    pub entries: BTreeMap<u64, Entry>,
    pub marks: Marks,
    pub format: u16,
}

/// Reads the whole legacy log at `path`. Every entry and mark of versions
/// 0 to 4 decodes as format 4's (commands were only ever appended), so no
/// conversion is needed; a database of a newer version is refused.
pub fn read(path: &Path) -> Result<Contents, LegacyError> {
    let db = Database::open(path)?;
    let r = db.begin_read()?;
    let meta = match r.open_table(META) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let get = |key: &str| -> Result<Option<Vec<u8>>, LegacyError> {
        match &meta {
            Some(m) => Ok(m.get(key)?.map(|v| v.value().to_vec())),
            None => Ok(None),
        }
    };
    let corrupt = |what: &str, e: codec::CodecError| redb::Error::Corrupted(format!("{what}: {e}"));
    let format = match get(KEY_FORMAT)? {
        None => 0,
        Some(b) => {
            let b: [u8; 2] = b.as_slice().try_into().map_err(|_| {
                redb::Error::Corrupted(format!("format key holds {} bytes, expected 2", b.len()))
            })?;
            format::check(&format!("raft log database {}", path.display()), u16::from_le_bytes(b))?
        }
    };
    let mut out = Contents { entries: BTreeMap::new(), marks: Marks::default(), format };
    match r.open_table(LOG) {
        Ok(log) => {
            for item in log.iter()? {
                let (k, v) = item?;
                let e: Entry = codec::decode_trusted(v.value()).map_err(|e| corrupt("log entry", e))?;
                out.entries.insert(k.value(), e);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(b) = get(KEY_VOTE)? {
        out.marks.vote = Some(codec::decode::<Vote>(&b).map_err(|e| corrupt("vote", e))?);
    }
    if let Some(b) = get(KEY_COMMITTED)? {
        out.marks.committed = codec::decode::<Option<LogId>>(&b).map_err(|e| corrupt("committed", e))?;
    }
    if let Some(b) = get(KEY_PURGED)? {
        out.marks.last_purged = Some(codec::decode::<LogId>(&b).map_err(|e| corrupt("last purged", e))?);
    }
    Ok(out)
}

/// Marks the legacy database at `path` as moved (see [`MOVED`]).
pub fn mark_moved(path: &Path) -> Result<(), LegacyError> {
    let db = Database::open(path)?;
    let w = db.begin_write()?;
    w.open_table(META)?.insert(KEY_FORMAT, &MOVED.to_le_bytes()[..])?;
    w.commit()?;
    Ok(())
}

/// True if the legacy database at `path` was already migrated.
pub fn is_moved(path: &Path) -> Result<bool, LegacyError> {
    let db = Database::open(path)?;
    let r = db.begin_read()?;
    let meta = match r.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let v = meta.get(KEY_FORMAT)?;
    Ok(v.is_some_and(|v| v.value() == MOVED.to_le_bytes()))
}
