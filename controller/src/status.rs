//! The ImagePrefetch state machine: phase and conditions from what the
//! controller observed. Pure logic.
//!
//! ```text
//!            no plan yet                    plan, some candidates not warm
//! Pending ──────────────▶ Learning ────────────────────────────▶ Warming
//!                            ▲                                     │ all warm
//!       image changed:       │                                     ▼
//!       learning restarts ───┴──────────────────────────────────  Ready
//! any state ──(problem: workload missing, agent failures, …)──▶ Degraded
//! ```
//!
//! `Learning` is also a condition: it stays True until every image learned
//! from `learnFromStarts` pod starts, while the phase moves on to Warming and
//! Ready as soon as a first plan exists.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use stoker_crds::{ImageStatus, NodeCounts, Phase};

/// Something that needs a person's attention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// CamelCase reason, e.g. `DeploymentNotFound`.
    pub reason: &'static str,
    pub message: String,
}

/// What one reconcile observed.
#[derive(Clone, Debug, Default)]
pub struct Observed<'a> {
    pub images: &'a [ImageStatus],
    /// `policy.learnFromStarts`.
    pub learn_target: u32,
    pub nodes: NodeCounts,
    pub problems: &'a [Problem],
}

/// The phase for `kubectl get`.
pub fn phase(observed: &Observed) -> Phase {
    if !observed.problems.is_empty() {
        Phase::Degraded
    } else if observed.images.is_empty() {
        Phase::Pending
    } else if !observed.images.iter().any(|i| i.plan.is_some()) {
        Phase::Learning
    } else if observed.nodes.warm < observed.nodes.total {
        Phase::Warming
    } else {
        Phase::Ready
    }
}

/// The four conditions, keeping each one's last transition time when its
/// status did not change.
pub fn conditions(
    previous: &[Condition],
    observed: &Observed,
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let phase = phase(observed);
    let still_learning = observed
        .images
        .iter()
        .filter(|i| i.pods_learned < observed.learn_target)
        .count();
    let learning = if observed.images.is_empty() {
        (
            false,
            "NoImages",
            "the workload has no images to learn".to_string(),
        )
    } else if still_learning > 0 {
        (
            true,
            "CollectingTraces",
            format!(
                "{still_learning} of {} images learned from fewer than {} pod starts",
                observed.images.len(),
                observed.learn_target
            ),
        )
    } else {
        (
            false,
            "PlanComplete",
            format!(
                "every image learned from {} pod starts",
                observed.learn_target
            ),
        )
    };
    let nodes = observed.nodes;
    let warming = if !observed.images.iter().any(|i| i.plan.is_some()) {
        (false, "NoPlan", "no plan learned yet".to_string())
    } else if nodes.total == 0 {
        (
            false,
            "NoCandidateNodes",
            "no node can run the workload".to_string(),
        )
    } else if nodes.warm < nodes.total {
        (
            true,
            "PushingPlans",
            format!(
                "{} warm, {} warming, {} failed of {} nodes",
                nodes.warm, nodes.warming, nodes.failed, nodes.total
            ),
        )
    } else {
        (
            false,
            "AllNodesWarm",
            format!("all {} candidate nodes are warm", nodes.total),
        )
    };
    let degraded = match observed.problems.first() {
        Some(first) => (
            true,
            first.reason,
            observed
                .problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
        None => (false, "AsExpected", String::new()),
    };
    let ready = if phase == Phase::Ready {
        (
            true,
            "AllNodesWarm",
            format!("all {} candidate nodes are warm", nodes.total),
        )
    } else {
        (false, phase_reason(phase), format!("phase is {phase}"))
    };
    [
        ("Ready", ready),
        ("Learning", learning),
        ("Warming", warming),
        ("Degraded", degraded),
    ]
    .into_iter()
    .map(|(type_, (status, reason, message))| {
        let status = if status { "True" } else { "False" }.to_string();
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time,
        }
    })
    .collect()
}

fn phase_reason(phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => "Pending",
        Phase::Learning => "Learning",
        Phase::Warming => "Warming",
        Phase::Ready => "AllNodesWarm",
        Phase::Degraded => "Degraded",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(pods_learned: u32, plan: bool) -> ImageStatus {
        ImageStatus {
            image: "app:1".into(),
            pods_learned,
            plan: plan.then(|| "cGxhbg==".into()),
            ..ImageStatus::default()
        }
    }

    fn counts(total: u32, warm: u32, warming: u32, failed: u32) -> NodeCounts {
        NodeCounts {
            total,
            warm,
            warming,
            failed,
        }
    }

    fn observed<'a>(
        images: &'a [ImageStatus],
        nodes: NodeCounts,
        problems: &'a [Problem],
    ) -> Observed<'a> {
        Observed {
            images,
            learn_target: 3,
            nodes,
            problems,
        }
    }

    fn condition<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
        conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn phases_follow_learning_and_warming() {
        let none: &[Problem] = &[];
        assert_eq!(
            phase(&observed(&[], counts(5, 0, 0, 0), none)),
            Phase::Pending
        );
        assert_eq!(
            phase(&observed(&[image(0, false)], counts(5, 0, 0, 0), none)),
            Phase::Learning
        );
        assert_eq!(
            phase(&observed(&[image(1, true)], counts(5, 2, 3, 0), none)),
            Phase::Warming
        );
        assert_eq!(
            phase(&observed(&[image(1, true)], counts(5, 5, 0, 0), none)),
            Phase::Ready
        );
        // No candidate node at all is trivially all warm.
        assert_eq!(
            phase(&observed(&[image(1, true)], counts(0, 0, 0, 0), none)),
            Phase::Ready
        );
        let problem = [Problem {
            reason: "DeploymentNotFound",
            message: "deployment web not found".into(),
        }];
        assert_eq!(
            phase(&observed(&[image(1, true)], counts(5, 5, 0, 0), &problem)),
            Phase::Degraded
        );
    }

    #[test]
    fn learning_stays_true_until_every_image_reached_the_target() {
        let images = [image(3, true), image(1, true)];
        let c = conditions(
            &[],
            &observed(&images, counts(2, 2, 0, 0), &[]),
            Some(4),
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(condition(&c, "Learning").status, "True");
        assert_eq!(condition(&c, "Learning").reason, "CollectingTraces");
        assert_eq!(condition(&c, "Ready").status, "True");
        assert_eq!(condition(&c, "Ready").observed_generation, Some(4));
        let done = [image(3, true)];
        let c = conditions(
            &[],
            &observed(&done, counts(2, 1, 1, 0), &[]),
            None,
            Timestamp::UNIX_EPOCH,
        );
        assert_eq!(condition(&c, "Learning").reason, "PlanComplete");
        assert_eq!(condition(&c, "Warming").status, "True");
        assert_eq!(
            condition(&c, "Warming").message,
            "1 warm, 1 warming, 0 failed of 2 nodes"
        );
        assert_eq!(condition(&c, "Ready").reason, "Warming");
    }

    #[test]
    fn degraded_names_every_problem() {
        let problems = [
            Problem {
                reason: "AgentUnreachable",
                message: "node a: refused".into(),
            },
            Problem {
                reason: "TooManyImages",
                message: "20 images, 16 tracked".into(),
            },
        ];
        let c = conditions(
            &[],
            &observed(&[image(0, false)], counts(0, 0, 0, 0), &problems),
            None,
            Timestamp::UNIX_EPOCH,
        );
        let degraded = condition(&c, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", "AgentUnreachable")
        );
        assert_eq!(degraded.message, "node a: refused; 20 images, 16 tracked");
    }

    #[test]
    fn transition_times_change_only_with_the_status() {
        let t0 = Timestamp::UNIX_EPOCH;
        let t1 = Timestamp::from_second(100).unwrap();
        let images = [image(1, true)];
        let first = conditions(&[], &observed(&images, counts(2, 1, 1, 0), &[]), None, t0);
        // Same statuses later: times stay.
        let again = conditions(
            &first,
            &observed(&images, counts(2, 1, 1, 0), &[]),
            None,
            t1,
        );
        assert_eq!(condition(&again, "Warming").last_transition_time, Time(t0));
        // Warming flips to False: its time moves, Degraded's does not.
        let warm = conditions(
            &again,
            &observed(&images, counts(2, 2, 0, 0), &[]),
            None,
            t1,
        );
        assert_eq!(condition(&warm, "Warming").last_transition_time, Time(t1));
        assert_eq!(condition(&warm, "Degraded").last_transition_time, Time(t0));
    }
}
