//! Leader election on a `coordination.k8s.io/v1` Lease, so that two replicas
//! can run and only one acts.
//!
//! No maintained crate supports kube 5 yet, and the protocol is small: the
//! leader renews `spec.renewTime` every `renew_every`; a candidate takes the
//! Lease over once `renewTime + leaseDurationSeconds` has passed. Every write
//! is a replace carrying the `resourceVersion` that was read, so of two
//! candidates racing for an expired Lease the API server lets exactly one win
//! (the other gets 409 Conflict).
//!
//! A leader that cannot renew within [`LeaseConfig::renew_deadline`] (two
//! thirds of the lease duration, as client-go's 10 s of 15 s) reports the
//! loss and the process exits. The deadline counts from the start of the last
//! successful attempt, which is before the `renewTime` it wrote, and each
//! attempt is cut off at the deadline, so a leader whose requests hang still
//! stops before any other replica may take the Lease over: a stale leader
//! never acts alongside a new one.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::Error;
use crate::error::http_status;

/// Where the Lease is and who we are.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// Written as whole seconds, rounded up.
    pub lease_duration: Duration,
    /// Renewal period, and the candidates' retry period. Keep it well below
    /// [`LeaseConfig::renew_deadline`], so that a leader gets several tries.
    pub renew_every: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        LeaseConfig {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
        }
    }

    /// A leader that has not renewed for this long stops acting: two thirds
    /// of the lease duration, so it has stopped before the lease expires.
    pub fn renew_deadline(&self) -> Duration {
        self.lease_duration * 2 / 3
    }

    /// `leaseDurationSeconds`: the duration rounded up to whole seconds (at
    /// least one), so that others never see a shorter lease than ours.
    fn lease_seconds(&self) -> i32 {
        let seconds = self.lease_duration.as_secs_f64().ceil().max(1.0);
        seconds.min(f64::from(i32::MAX)) as i32
    }
}

/// What to do with the Lease as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseStep {
    /// No Lease yet: create it, held by us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Another holder's lease expired (or nobody holds it): take it over.
    TakeOver,
    /// Another holder's lease is valid until then.
    Wait { holder: String },
}

/// Decides the next step from the Lease as read. Pure.
pub fn next_step(lease: Option<&Lease>, identity: &str, now: Timestamp) -> LeaseStep {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() {
            LeaseStep::TakeOver
        } else {
            LeaseStep::Create
        };
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder == identity {
        return LeaseStep::Renew;
    }
    let expires = spec
        .renew_time
        .as_ref()
        .map(|t| t.0 + SignedDuration::from_secs(spec.lease_duration_seconds.unwrap_or(15).into()));
    match expires {
        Some(expires) if !holder.is_empty() && expires > now => LeaseStep::Wait { holder },
        _ => LeaseStep::TakeOver,
    }
}

/// Applies `step` to `lease` (as read), returning the object to write.
fn held_by_us(
    lease: Option<Lease>,
    config: &LeaseConfig,
    step: &LeaseStep,
    now: Timestamp,
) -> Lease {
    let mut lease = lease.unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(config.name.clone()),
            namespace: Some(config.namespace.clone()),
            ..ObjectMeta::default()
        },
        spec: None,
    });
    let mut spec = lease.spec.take().unwrap_or_default();
    if *step != LeaseStep::Renew {
        spec.acquire_time = Some(MicroTime(now));
        if *step == LeaseStep::TakeOver {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
    }
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(config.lease_seconds()),
        renew_time: Some(MicroTime(now)),
        ..spec
    });
    lease
}

/// One round: reads the Lease and acquires or renews it if it can. Returns
/// whether we hold it now.
pub async fn try_acquire_or_renew(api: &Api<Lease>, config: &LeaseConfig) -> Result<bool, Error> {
    let current = api
        .get_opt(&config.name)
        .await
        .map_err(Error::kube(format!(
            "get lease {}/{}",
            config.namespace, config.name
        )))?;
    let now = Timestamp::now();
    let step = next_step(current.as_ref(), &config.identity, now);
    if let LeaseStep::Wait { .. } = step {
        return Ok(false);
    }
    let lease = held_by_us(current, config, &step, now);
    let result = if step == LeaseStep::Create {
        api.create(&PostParams::default(), &lease).await
    } else {
        api.replace(&config.name, &PostParams::default(), &lease)
            .await
    };
    match result {
        Ok(_) => Ok(true),
        // Someone else wrote first (created it, or took it over).
        Err(e) if matches!(http_status(&e), Some(409)) => Ok(false),
        Err(e) => Err(Error::kube(format!(
            "write lease {}/{}",
            config.namespace, config.name
        ))(e)),
    }
}

/// Leadership held by this replica. `lost` turns true when another replica
/// took the Lease or renewing failed for [`LeaseConfig::renew_deadline`].
pub struct Leadership {
    pub lost: watch::Receiver<bool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Waits until this replica holds the Lease, then keeps renewing it in the
/// background.
pub async fn acquire(api: Api<Lease>, config: LeaseConfig) -> Leadership {
    let renewed = loop {
        let started = Instant::now();
        let attempt = tokio::time::timeout_at(
            started + config.renew_deadline(),
            try_acquire_or_renew(&api, &config),
        );
        match attempt.await {
            Ok(Ok(true)) => break started,
            Ok(Ok(false)) => tracing::debug!(lease = %config.name, "another replica leads"),
            Ok(Err(error)) => tracing::warn!(%error, "leader election"),
            Err(_) => tracing::warn!(lease = %config.name, "leader election: no answer in time"),
        }
        tokio::time::sleep(config.renew_every).await;
    };
    tracing::info!(lease = %config.name, identity = %config.identity, "became leader");
    let (lost_tx, lost) = watch::channel(false);
    let renewer = tokio::spawn(async move {
        renew_until_lost(&api, &config, renewed).await;
        let _ = lost_tx.send(true);
    });
    Leadership { lost, renewer }
}

/// Renews every `renew_every` until the Lease is lost: another replica holds
/// it, or no attempt succeeded within the renew deadline of the last
/// successful one (which started at `renewed`).
async fn renew_until_lost(api: &Api<Lease>, config: &LeaseConfig, mut renewed: Instant) {
    loop {
        let deadline = renewed + config.renew_deadline();
        tokio::time::sleep_until((Instant::now() + config.renew_every).min(deadline)).await;
        let started = Instant::now();
        match tokio::time::timeout_at(deadline, try_acquire_or_renew(api, config)).await {
            Ok(Ok(true)) => renewed = started,
            Ok(Ok(false)) => {
                tracing::error!(lease = %config.name, "lost the lease to another replica");
                return;
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot renew the lease");
                if Instant::now() >= deadline {
                    tracing::error!(lease = %config.name, "could not renew the lease in time");
                    return;
                }
            }
            Err(_) => {
                tracing::error!(lease = %config.name, deadline = ?config.renew_deadline(), "could not renew the lease in time");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_at: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                renew_time: Some(MicroTime(Timestamp::from_second(renewed_at).unwrap())),
                lease_duration_seconds: Some(duration),
                ..LeaseSpec::default()
            }),
        }
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn lease_steps() {
        assert_eq!(next_step(None, "me", at(0)), LeaseStep::Create);
        assert_eq!(
            next_step(Some(&lease("me", 0, 15)), "me", at(100)),
            LeaseStep::Renew
        );
        assert_eq!(
            next_step(Some(&lease("other", 100, 15)), "me", at(110)),
            LeaseStep::Wait {
                holder: "other".into()
            }
        );
        assert_eq!(
            next_step(Some(&lease("other", 100, 15)), "me", at(116)),
            LeaseStep::TakeOver
        );
        assert_eq!(
            next_step(Some(&lease("", 100, 15)), "me", at(101)),
            LeaseStep::TakeOver
        );
        assert_eq!(
            next_step(Some(&Lease::default()), "me", at(0)),
            LeaseStep::TakeOver
        );
    }

    #[test]
    fn the_lease_is_written_in_whole_seconds_rounded_up_and_the_deadline_is_shorter() {
        let mut config = LeaseConfig::new("stoker-system", "stoker-controller", "me");
        assert_eq!(config.lease_seconds(), 15);
        assert_eq!(config.renew_deadline(), Duration::from_secs(10));
        config.lease_duration = Duration::from_millis(2500);
        assert_eq!(config.lease_seconds(), 3);
        config.lease_duration = Duration::from_millis(100);
        assert_eq!(config.lease_seconds(), 1);
        assert!(config.renew_deadline() < config.lease_duration);
    }

    #[test]
    fn taking_over_counts_a_transition_renewing_does_not() {
        let config = LeaseConfig::new("stoker-system", "stoker-controller", "me");
        let taken = held_by_us(
            Some(lease("other", 0, 15)),
            &config,
            &LeaseStep::TakeOver,
            at(50),
        );
        let spec = taken.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("me"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.acquire_time, Some(MicroTime(at(50))));
        let renewed = held_by_us(Some(lease("me", 0, 15)), &config, &LeaseStep::Renew, at(60));
        let spec = renewed.spec.unwrap();
        assert_eq!(spec.lease_transitions, None);
        assert_eq!(spec.acquire_time, None);
        assert_eq!(spec.renew_time, Some(MicroTime(at(60))));
    }
}
