//! The conformance suite: every clause of CONTRACT §2 (registry) and §5 (leases), run against
//! the Postgres registry, the same behind the watching decorator, and the in-memory registry.
//! A divergence is a failing test.

#[path = "../common/mod.rs"]
mod common;

mod append;
mod children;
mod complete;
mod concurrency;
mod durable;
mod hostile;
mod leases;
mod list_prune;
mod queues;
mod register;
mod runnable;
mod start;
mod support;

/// Generates one `#[tokio::test]` per case and backend: `pg::<case>` (every append through the
/// group commit statement), `ungrouped::<case>` (group commit off, and runnable work claimed
/// process by process as on distributed tables), `memory::<case>` and `watched::<case>`
/// (Postgres behind `WatchedProcessRegistry` with the NOTIFY sink, which must change no
/// result), and `citus::<case>` (a database of its own on a Citus cluster shared by the
/// binary, a coordinator and two workers, the tables distributed; skipped without Citus).
macro_rules! conformance {
    ($($module:ident :: $case:ident),+ $(,)?) => {
        mod pg {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let store = crate::common::PgStore::new().await;
                    crate::$module::$case(&store).await;
                }
            )+
        }
        mod ungrouped {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let store = crate::common::UngroupedPgStore::new().await;
                    crate::$module::$case(&store).await;
                }
            )+
        }
        mod watched {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let store = crate::common::WatchedPgStore::new().await;
                    crate::$module::$case(&store).await;
                }
            )+
        }
        mod citus {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let Some(store) = crate::common::CitusStore::new().await else {
                        return;
                    };
                    crate::$module::$case(&store).await;
                }
            )+
        }
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let store = crate::common::MemStore::new();
                    crate::$module::$case(&store).await;
                }
            )+
        }
    };
}

conformance! {
    register::registers_a_pending_process,
    register::generates_a_uuid_v7_id_when_absent,
    register::identical_registration_returns_the_existing_record,
    register::different_registration_conflicts,
    register::concurrent_registration_creates_one_process,
    register::invalid_kind_and_oversized_input_are_refused,
    register::unknown_process_is_absent,
    append::appends_get_dense_seqs_from_one,
    append::append_to_unknown_process_is_not_found,
    append::reserved_and_malformed_event_types_are_refused,
    append::oversized_payloads_are_refused_and_the_limit_is_inclusive,
    append::payloads_that_postgres_cannot_store_are_invalid,
    append::batches_are_consecutive_and_all_or_nothing,
    append::malformed_batches_are_refused,
    append::first_append_marks_a_pending_process_running,
    append::replay_returns_the_stored_event_once,
    append::replay_with_other_content_conflicts,
    append::replay_after_terminal_still_returns_the_stored_event,
    append::batch_replay_is_whole_or_conflict,
    append::terminal_process_is_sealed,
    append::events_after_pages_in_order,
    append::pages_are_bounded_in_bytes,
    append::the_row_records_the_first_cancel_request,
    append::events_after_refuses_unknown_process_and_bad_bounds,
    append::fenced_appends_record_the_generation,
    append::stale_and_expired_leases_cannot_append,
    complete::completion_appends_the_terminal_event_last_and_fills_the_column,
    complete::every_terminal_state_is_reachable,
    complete::identical_completion_is_idempotent_other_is_already_terminal,
    complete::completion_refusals_write_nothing,
    complete::completion_releases_the_lease,
    leases::claim_grants_then_reports_busy,
    leases::generation_never_decreases_across_release_and_reclaim,
    leases::renew_extends_a_live_lease_only,
    leases::release_is_idempotent_and_ignores_stale_tokens,
    leases::expired_lease_can_be_claimed_by_another_owner,
    leases::claim_refusals,
    list_prune::list_filters_and_paginates,
    list_prune::list_refuses_bad_limits_and_kinds,
    list_prune::prune_removes_old_terminal_processes_only,
    runnable::claim_runnable_takes_the_oldest_runnable_processes,
    runnable::claim_runnable_reports_a_lost_owner_but_not_a_released_one,
    runnable::concurrent_pods_claim_each_process_once,
    runnable::claim_runnable_refuses_bad_arguments,
    runnable::terminal_states_reads_many_processes_at_once,
    runnable::next_lease_expiry_reports_the_earliest_live_lease,
    concurrency::three_pods_append_to_one_process_without_gaps,
    concurrency::three_pods_append_to_500_processes_without_gaps,
    concurrency::concurrent_retries_of_one_key_write_one_event,
    concurrency::concurrent_claims_grant_one_lease,
    concurrency::concurrent_completions_end_a_process_once,
    hostile::numbers_compare_by_value_everywhere,
    hostile::bad_writers_are_refused_before_anything_is_written,
    hostile::a_batch_is_held_to_its_total_size,
    hostile::instants_out_of_range_are_invalid_input,
    hostile::the_deepest_accepted_value_reads_back_everywhere,
    durable::a_delayed_start_is_not_claimed_before_its_time,
    durable::a_suspended_process_waits_without_a_lease_and_resumes,
    durable::suspension_refusals,
    durable::a_message_wakes_a_process_waiting_for_its_topic,
    durable::a_message_already_there_ends_a_suspension_at_once,
    durable::messages_are_refused_for_ended_and_unknown_processes,
    durable::a_deadline_makes_any_unleased_process_claimable,
    durable::retries_are_counted_apart_from_attempts,
    durable::bad_schedules_are_invalid_input,
    durable::a_waiting_process_can_be_cancelled,
    durable::proclogs_replay_keys_are_not_a_callers,
    children::a_child_records_its_parent_and_is_listed_under_it,
    children::a_child_needs_a_live_parent,
    children::a_childs_end_reaches_its_waiting_parent_once,
    queues::a_registration_records_its_queue_key_and_priority,
    queues::racing_pods_never_exceed_a_queue_or_key_limit,
    queues::a_per_pod_limit_holds_each_pod,
    queues::keys_are_served_round_robin,
    queues::priority_orders_a_keys_work,
    queues::a_rate_limit_counts_starts_in_its_period,
    queues::limits_change_at_run_time,
    queues::a_waiting_process_holds_no_slot,
    queues::queues_are_listed_by_pages,
    queues::a_process_past_its_deadline_is_failed_whatever_the_limits,
    queues::keys_that_cannot_be_served_do_not_hold_the_turn,
    queues::within_a_turn_higher_priority_goes_first,
    start::deduplication_answers_the_first_start_within_its_window,
    start::a_singleton_key_has_one_process_that_has_not_ended,
    start::debounce_keeps_the_last_start_of_a_burst,
    start::bad_start_policies_are_refused_and_write_nothing,
}
