//! [`CdcSource`] on a real PostgreSQL: a control session, and a peek session opened alongside
//! (its handshake overlaps the control work).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_postgres::Client;

use super::peek::{self, PgPeek};
use super::{
    Capture, CdcSource, PeekRequest, Publications, Replication, SlotState, catalog, follow,
    publication, slot,
};
use crate::change::decoder::RelationInfo;
use crate::config::PgConfig;
use crate::error::{Error, Result};
use crate::lsn::Lsn;
use crate::selection::Selection;

/// The CDC poller's PostgreSQL source.
pub struct PgSource {
    cfg: PgConfig,
    control: Arc<Client>,
    /// The peek session; a failed connect surfaces (with its kind) when it is needed.
    peek: Option<Client>,
    peek_error: Mutex<Option<Error>>,
    decoding_work_mem: Mutex<String>,
    /// `format_type` of (type oid, modifier) pairs already asked for.
    type_names: Mutex<HashMap<(u32, i32), String>>,
}

impl PgSource {
    /// Connects the control and peek sessions (`pgshift-cdc`, `pgshift-cdc-peek`).
    pub async fn connect(cfg: &PgConfig) -> Result<PgSource> {
        let mut control_cfg = cfg.clone();
        control_cfg.application_name = "pgshift-cdc".to_owned();
        let mut peek_cfg = cfg.clone();
        peek_cfg.application_name = "pgshift-cdc-peek".to_owned();
        let (control, peek) = tokio::join!(super::connect(&control_cfg), super::connect(&peek_cfg));
        let (peek, peek_error) = match peek {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(e)),
        };
        Ok(PgSource {
            cfg: cfg.clone(),
            control: Arc::new(control?),
            peek,
            peek_error: Mutex::new(peek_error),
            decoding_work_mem: Mutex::new("256MB".to_owned()),
            type_names: Mutex::new(HashMap::new()),
        })
    }

    /// A source over an open session, without a peek session (the full load's plan creates
    /// the replication through it).
    pub fn from_control(cfg: &PgConfig, control: Client) -> PgSource {
        PgSource {
            cfg: cfg.clone(),
            control: Arc::new(control),
            peek: None,
            peek_error: Mutex::new(None),
            decoding_work_mem: Mutex::new("256MB".to_owned()),
            type_names: Mutex::new(HashMap::new()),
        }
    }

    /// The control session (for what the seam does not cover: the catalog of a plan).
    pub fn control(&self) -> &Client {
        &self.control
    }

    fn peek_session(&self) -> Result<&Client> {
        match &self.peek {
            Some(c) => Ok(c),
            None => Err(self
                .peek_error
                .lock()
                .ok()
                .and_then(|mut e| e.take())
                .unwrap_or_else(|| Error::Source("the peek session could not connect".to_owned()))),
        }
    }
}

impl CdcSource for PgSource {
    type Peek = PgPeek;

    async fn create_replication(&self, name: &str, capture: &Capture) -> Result<Replication> {
        if !capture.allow_empty {
            let tables = catalog::user_tables(&self.control, &Selection::all()).await?;
            let found: Vec<(String, String)> =
                tables.into_iter().map(|t| (t.schema, t.name)).collect();
            if let Some(e) = capture.selection.empty_rules_error(&found, "tables") {
                return Err(e);
            }
        }
        // Publications first: they exist at every WAL position the slot will decode.
        self.sync_publications(name, capture).await?;
        let server = catalog::server_info(&self.control).await?;
        let (start_lsn, _) = slot::create_slot(&self.control, name, &server.database).await?;
        Ok(Replication {
            start_lsn,
            database: server.database,
        })
    }

    async fn adopt_replication(
        &self,
        slot: &str,
        publication: &str,
        start: Option<Lsn>,
    ) -> Result<Replication> {
        let server = catalog::server_info(&self.control).await?;
        let state = slot::slot_state(&self.control, slot).await?;
        let exists = publication::exists(&self.control, publication).await?;
        // The flush position once it reached the insert position: a start just written is
        // not "past the WAL".
        let flush = slot::drain_target(&self.control, std::time::Duration::from_secs(2)).await?;
        let start_lsn = super::check_adoption(
            slot,
            publication,
            state.as_ref(),
            exists,
            &server.database,
            start,
            flush,
        )?;
        // The slot moves to the start now: what it held before it is the user's choice to
        // skip (a later poll would otherwise find transactions it never staged).
        if state.and_then(|s| s.confirmed_flush_lsn) < Some(start_lsn) {
            slot::advance(&self.control, slot, start_lsn).await?;
        }
        Ok(Replication {
            start_lsn,
            database: server.database,
        })
    }

    async fn adopted_publication(
        &self,
        publication: &str,
        capture: &Capture,
    ) -> Result<Publications> {
        if !publication::exists(&self.control, publication).await? {
            return Err(Error::Source(format!(
                "publication {publication} (the task's, made by its user) no longer exists: create it again with the tables it published"
            )));
        }
        let published = publication::tables(&self.control, publication).await?;
        let selected = catalog::user_tables(&self.control, &capture.selection).await?;
        let skipped: Vec<String> = selected
            .iter()
            .filter(|t| !t.is_partition)
            .filter(|t| !published.contains(&(t.schema.clone(), t.name.clone())))
            .map(|t| format!("{}.{}", t.schema, t.name))
            .collect();
        if !skipped.is_empty() {
            tracing::warn!(%publication, ?skipped, "selected tables the user's publication does not publish: their changes are not captured");
        }
        Ok(Publications {
            skipped,
            ..Publications::default()
        })
    }

    async fn sync_publications(&self, name: &str, capture: &Capture) -> Result<Publications> {
        let server = catalog::server_info(&self.control).await?;
        let mut tables = catalog::user_tables(&self.control, &capture.selection).await?;
        if capture.replica_identity_full {
            publication::set_replica_identity_full(&self.control, &mut tables).await?;
        }
        let mut pubs = publication::sync(&self.control, name, &tables, server.version_num).await?;
        pubs.follows = follow::ensure(
            &self.control,
            name,
            capture,
            server.version_num,
            server.superuser,
        )
        .await?;
        if !pubs.added.is_empty() || !pubs.dropped.is_empty() {
            tracing::info!(publication = %name, added = ?pubs.added, dropped = ?pubs.dropped, insert_only = ?pubs.insert_only, "publications brought to the selection");
        }
        Ok(pubs)
    }

    async fn drop_replication(&self, name: &str) -> Result<Vec<String>> {
        let mut dropped = Vec::new();
        if slot::drop_slot(&self.control, name).await? {
            dropped.push(format!("replication slot {name}"));
        }
        for p in publication::drop_all(&self.control, name).await? {
            dropped.push(format!("publication {p}"));
        }
        if follow::drop(&self.control, name).await? {
            dropped.push(format!("event trigger {}", follow::trigger_name(name)));
        }
        Ok(dropped)
    }

    async fn slot_state(&self, name: &str) -> Result<Option<SlotState>> {
        slot::slot_state(&self.control, name).await
    }

    async fn advance(&self, name: &str, to: Lsn) -> Result<()> {
        slot::advance(&self.control, name, to).await
    }

    async fn drain_target(&self) -> Result<Lsn> {
        slot::drain_target(&self.control, std::time::Duration::from_secs(2)).await
    }

    async fn free_slots(&self, name: &str) -> Result<i64> {
        Ok(slot::slot_usage(&self.control, name).await?.free())
    }

    async fn relation_info(&self, rel_id: u32, types: &[(u32, i32)]) -> Result<RelationInfo> {
        let primary_key = catalog::primary_key_columns(&self.control, rel_id).await?;
        let missing: Vec<(u32, i32)> = {
            let known = self
                .type_names
                .lock()
                .map_err(|_| Error::Source("type-name cache poisoned".to_owned()))?;
            types
                .iter()
                .filter(|t| !known.contains_key(t))
                .copied()
                .collect()
        };
        let found = if missing.is_empty() {
            Vec::new()
        } else {
            catalog::type_names(&self.control, &missing).await?
        };
        let mut known = self
            .type_names
            .lock()
            .map_err(|_| Error::Source("type-name cache poisoned".to_owned()))?;
        for (t, n) in missing.into_iter().zip(found) {
            known.insert(t, n);
        }
        let type_names = types
            .iter()
            .map(|t| known.get(t).cloned().unwrap_or_else(|| t.0.to_string()))
            .collect();
        Ok(RelationInfo {
            primary_key,
            type_names,
        })
    }

    async fn table_definition(
        &self,
        rel_id: u32,
    ) -> Result<Option<crate::change::ddl::TableDefinition>> {
        let row = self
            .control
            .query_opt(crate::change::ddl::DEFINITION_SQL, &[&rel_id])
            .await
            .map_err(|e| {
                Error::postgres(format!("reading the definition of relation {rel_id}"), e)
            })?;
        row.map(|r| crate::change::ddl::parse_definition(r.get(0)))
            .transpose()
    }

    async fn type_ddl(&self, rel_id: u32) -> Result<Vec<crate::source::ddl::DdlItem>> {
        crate::source::ddl::type_items(&self.control, &[rel_id]).await
    }

    async fn prepare_peeks(&self, decoding_work_mem: &str) -> Result<i32> {
        if let Ok(mut m) = self.decoding_work_mem.lock() {
            decoding_work_mem.clone_into(&mut m);
        }
        peek::prepare_peek_session(self.peek_session()?, decoding_work_mem).await
    }

    async fn peek(&self, req: &PeekRequest) -> Result<PgPeek> {
        let work_mem = self
            .decoding_work_mem
            .lock()
            .map(|m| m.clone())
            .unwrap_or_else(|_| "256MB".to_owned());
        PgPeek::start(
            &self.cfg,
            self.peek_session()?,
            self.control.clone(),
            req,
            &work_mem,
        )
        .await
    }
}
