//! SPEC section 8's convergence guarantee under a concurrent random workload: 2,000 writes over
//! 50 conversations of 20 users while readers hammer the API; once writes stop and the stream
//! drains, every user's conversations and every conversation's messages equal DynamoDB.
//! The fault tests (tests/it/faults.rs) end with the same check.

use std::sync::Arc;
use std::time::Duration;

use crate::support::app::App;
use crate::support::workload::{converge, Cast, Readers, Workload};

const USERS: usize = 20;
const GROUPS: usize = 50;
const WRITES: usize = 2000;
const WRITERS: usize = 8;
const READERS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_equals_dynamodb_after_a_concurrent_random_workload() {
    let app = App::start().await;
    let cast = Arc::new(Cast::new(&app, "user", USERS, GROUPS, 7).await);
    let api = app.api_client();
    let readers = Readers::start(&api, cast.clone(), READERS);
    Workload::new(cast.clone(), WRITERS).run(&app.store(), WRITES).await;
    let seen = readers.stop().await;
    let server_errors: usize = seen.iter().filter(|(s, _)| **s >= 500 || **s == 0).map(|(_, n)| n).sum();
    assert_eq!(server_errors, 0, "5xx answers (or dropped connections) during the workload: {seen:?}");
    let reads: usize = seen.values().sum();
    assert!(reads > 100, "the readers barely ran ({reads} reads)");

    // Drained: every answer equals a consistent read of DynamoDB.
    converge(&api, &app.store(), &cast, Duration::from_secs(60)).await;
    app.stop().await;
}
