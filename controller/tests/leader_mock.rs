//! Leader election against a scripted API server: the exact Lease requests.

mod common;

use common::{expect, mock_client};
use http::{Method, StatusCode};
use stoker_controller::leader::{LeaseConfig, try_acquire_or_renew};

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/stoker-system/leases";

fn lease(holder: &str, renewed: &str, version: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "stoker-controller", "namespace": "stoker-system", "resourceVersion": version},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": renewed}
    })
}

#[tokio::test]
async fn the_first_replica_creates_the_lease() {
    let (client, mut api) = mock_client();
    let config = LeaseConfig::new("stoker-system", "stoker-controller", "replica-a");
    let leases = kube::Api::namespaced(client, "stoker-system");
    let task = tokio::spawn(async move { try_acquire_or_renew(&leases, &config).await });
    expect(&mut api, Method::GET, &format!("{LEASE}/stoker-controller"))
        .await
        .fail(404, "NotFound");
    let create = expect(&mut api, Method::POST, LEASE).await;
    assert_eq!(create.body["metadata"]["name"], "stoker-controller");
    assert_eq!(create.body["spec"]["holderIdentity"], "replica-a");
    assert_eq!(create.body["spec"]["leaseDurationSeconds"], 15);
    assert!(create.body["spec"]["renewTime"].is_string());
    create.echo(StatusCode::CREATED);
    assert!(task.await.unwrap().unwrap());
}

#[tokio::test]
async fn a_valid_lease_of_another_replica_is_respected() {
    let (client, mut api) = mock_client();
    let config = LeaseConfig::new("stoker-system", "stoker-controller", "replica-b");
    let leases = kube::Api::namespaced(client, "stoker-system");
    let task = tokio::spawn(async move { try_acquire_or_renew(&leases, &config).await });
    let far_future = "2999-01-01T00:00:00.000000Z";
    expect(&mut api, Method::GET, &format!("{LEASE}/stoker-controller"))
        .await
        .reply(StatusCode::OK, lease("replica-a", far_future, "7"));
    assert!(!task.await.unwrap().unwrap());
    common::assert_idle(&mut api).await;
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_with_its_resource_version_and_a_lost_race_is_not_an_error()
{
    let (client, mut api) = mock_client();
    let config = LeaseConfig::new("stoker-system", "stoker-controller", "replica-b");
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client, "stoker-system");
    let (l, c) = (leases.clone(), config.clone());
    let task = tokio::spawn(async move { try_acquire_or_renew(&l, &c).await });
    expect(&mut api, Method::GET, &format!("{LEASE}/stoker-controller"))
        .await
        .reply(
            StatusCode::OK,
            lease("replica-a", "2020-01-01T00:00:00.000000Z", "7"),
        );
    let replace = expect(&mut api, Method::PUT, &format!("{LEASE}/stoker-controller")).await;
    assert_eq!(
        replace.body["metadata"]["resourceVersion"], "7",
        "optimistic concurrency"
    );
    assert_eq!(replace.body["spec"]["holderIdentity"], "replica-b");
    assert_eq!(replace.body["spec"]["leaseTransitions"], 1);
    replace.echo(StatusCode::OK);
    assert!(task.await.unwrap().unwrap());

    // The same race lost: 409 means someone else won.
    let task = tokio::spawn(async move { try_acquire_or_renew(&leases, &config).await });
    expect(&mut api, Method::GET, &format!("{LEASE}/stoker-controller"))
        .await
        .reply(
            StatusCode::OK,
            lease("replica-a", "2020-01-01T00:00:00.000000Z", "7"),
        );
    expect(&mut api, Method::PUT, &format!("{LEASE}/stoker-controller"))
        .await
        .fail(409, "Conflict");
    assert!(!task.await.unwrap().unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_renewal_hangs_reports_the_loss_before_its_lease_expires() {
    let (client, mut api) = mock_client();
    let config = LeaseConfig::new("stoker-system", "stoker-controller", "replica-a");
    let lease_duration = config.lease_duration;
    let leases = kube::Api::namespaced(client, "stoker-system");
    let started = tokio::time::Instant::now();
    let task = tokio::spawn(stoker_controller::leader::acquire(leases, config));
    expect(&mut api, Method::GET, &format!("{LEASE}/stoker-controller"))
        .await
        .fail(404, "NotFound");
    expect(&mut api, Method::POST, LEASE)
        .await
        .echo(StatusCode::CREATED);
    let mut leadership = task.await.unwrap();

    // The first renewal reaches the API server, which never answers.
    let unanswered = expect(&mut api, Method::GET, &format!("{LEASE}/stoker-controller")).await;
    tokio::time::timeout(lease_duration * 2, leadership.lost.wait_for(|lost| *lost))
        .await
        .expect("the leader never noticed that it cannot renew")
        .unwrap();
    // Virtual time: the renewal was cut off at the renew deadline, before
    // another replica could take the lease over.
    let stopped_after = started.elapsed();
    assert!(
        stopped_after < lease_duration,
        "stepped down after {stopped_after:?}, the lease lasts {lease_duration:?}"
    );
    drop(unanswered);
}
