"""Answer a CDS Hooks service call: validate the request, resolve prefetch (fetching what is missing),
evaluate with the pure core, and shape the cards for the hook.

CDS Hooks 2.0 semantics: an absent prefetch key or one holding an OperationOutcome is fetched from
``fhirServer``; ``null`` means "no data"; data the rules need that cannot be had → 412; no advice → 200
with an empty card list. A Medication that a medication resource or a draft order names (``Medication/id``) and the
request does not hold is read from ``fhirServer`` too; one that cannot be had is a data gap, not a 412.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import chain
from typing import Any

from starlette.concurrency import run_in_threadpool

from service.cds.cards import for_call, make_card
from service.cds.discovery import REQUIRED_KEYS, SERVICES_BY_ID, prefetch_templates, render_template
from service.cds.engine import Evaluation, evaluate_patient
from service.cds.fhirutil import resource_ref
from service.cds.grouping import group_by_patient, unresolved_medications
from service.cds.orders import draft_medication_requests, draft_medications, order_risk_cards
from service.cds.rules import RULE_IDS
from service.cds.thresholds import Thresholds
from service.errors import BadRequest, NotFound, PrefetchUnavailable
from service.fhir.client import next_link
from service.fhir.hook_fetch import FetchRefused, HookFetcher, check_fhir_server
from service.terminology.catalog import Catalog
from service.usecases.turns import Turn

ORDER_HOOKS = frozenset({"order-select", "order-sign"})


@dataclass(frozen=True)
class StoredAssessment:
    evaluated_at: datetime
    rules_version: str
    mappings_version: str
    assessment: dict[str, Any]


#: Port: the latest stored assessment of a patient (from background monitoring), or None.
StoredLookup = Callable[[str], StoredAssessment | None]
KNOWN_HOOKS = frozenset({"patient-view", "encounter-start", "encounter-discharge", "order-select", "order-sign", "appointment-book"})


@dataclass
class HookAnswer:
    response: dict[str, Any]
    service_id: str
    patient_ref: str
    data_path: str  # "prefetch" | "fallback" | "stored"
    evaluation: Evaluation | None
    cards: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _paused(turn: Turn | None) -> AbstractAsyncContextManager[None]:
    return turn.paused() if turn is not None else nullcontext()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BadRequest(message)


class HookService:
    def __init__(
        self,
        *,
        catalog: Catalog,
        thresholds: Thresholds,
        topic_system: str,
        fetcher: HookFetcher,
        fhir_server_allowlist: list[str],
        dev_mode: bool,
        stored: StoredLookup | None = None,
        stored_fresh_s: int = 3600,
        max_medication_reads: int = 50,
        max_draft_orders: int = 100,
    ) -> None:
        self.stored = stored
        self.max_medication_reads = max_medication_reads
        self.max_draft_orders = max_draft_orders
        self.stored_fresh_s = stored_fresh_s
        self.catalog = catalog
        self.thresholds = thresholds
        self.topic_system = topic_system
        self.fetcher = fetcher
        self.allowlist = fhir_server_allowlist
        self.dev_mode = dev_mode
        self.templates = prefetch_templates(catalog)

    def validate(self, service_id: str, body: Any) -> tuple[str, dict[str, Any]]:
        service = SERVICES_BY_ID.get(service_id)
        if service is None:
            raise NotFound(f"unknown CDS service {service_id!r}")
        _require(isinstance(body, dict), "the request body must be a JSON object")
        hook = body.get("hook")
        _require(isinstance(hook, str) and bool(hook), "'hook' is required")
        # Name the hook only when it is a known one: an arbitrary string from the body is never echoed.
        named = f"hook {hook!r}" if hook in KNOWN_HOOKS else "the hook"
        _require(hook == service.hook, f"{named} does not match service {service_id!r} ({service.hook})")
        _require(isinstance(body.get("hookInstance"), str) and bool(body.get("hookInstance")), "'hookInstance' is required")
        context = body.get("context")
        _require(isinstance(context, dict), "'context' must be an object")
        patient_id = context.get("patientId")
        _require(isinstance(patient_id, str) and bool(patient_id) and "/" not in patient_id, "'context.patientId' is required")
        if hook == "encounter-start":
            encounter = context.get("encounterId")
            _require(isinstance(encounter, str) and bool(encounter), "'context.encounterId' is required for encounter-start")
        if hook in ORDER_HOOKS:
            _require(isinstance(context.get("draftOrders"), dict), "'context.draftOrders' must be a Bundle")
        if hook == "order-select":
            sel = context.get("selections")
            _require(isinstance(sel, list) and all(isinstance(s, str) for s in sel), "'context.selections' must be a list of references")
        _require(body.get("prefetch") is None or isinstance(body.get("prefetch"), dict), "'prefetch' must be an object")
        server = body.get("fhirServer")
        _require(server is None or isinstance(server, str), "'fhirServer' must be a string")
        auth = body.get("fhirAuthorization")
        if auth is not None:
            _require(isinstance(auth, dict) and isinstance(auth.get("access_token"), str), "'fhirAuthorization.access_token' is required")
            _require(isinstance(server, str), "'fhirServer' is required with 'fhirAuthorization'")
        return hook, context

    async def answer(self, service_id: str, body: Any, now: datetime, turn: Turn | None = None) -> HookAnswer:
        """The cards for one call. ``turn``: the caller's CPU turn (:mod:`service.usecases.turns`), given up while
        fetching from ``fhirServer`` or reading the stored assessment."""
        hook, context = self.validate(service_id, body)
        patient_ref = f"Patient/{context['patientId']}"
        prefetch: dict[str, Any] = body.get("prefetch") or {}
        resources: list[Any] = []
        to_fetch: dict[str, str] = {}
        paged: dict[str, str] = {}
        for key, template in self.templates.items():
            if key in prefetch:
                value = prefetch[key]
                if value is None:
                    continue  # the EHR says: no data
                _require(isinstance(value, dict) and isinstance(value.get("resourceType"), str), f"prefetch {key!r} is not a FHIR resource")
                if value["resourceType"] == "OperationOutcome":
                    to_fetch[key] = template  # the EHR failed to prefetch: try ourselves
                else:
                    resources.append(value)
                    if value["resourceType"] == "Bundle" and (link := next_link(value)) is not None:
                        paged[key] = link  # a paged searchset: the rest is fetched like a missing key
            else:
                to_fetch[key] = template
        notes: list[str] = []
        data_path = "prefetch"
        if to_fetch or paged:
            data_path = "fallback"
            async with _paused(turn):
                try:
                    fetched, notes = await self._fetch(body, context, to_fetch, paged)
                except PrefetchUnavailable:
                    answer = await self._from_stored(hook, service_id, patient_ref, now, body["hookInstance"])
                    if answer is None:
                        raise
                    return answer
            resources.extend(fetched)
        groups = group_by_patient(resources)  # flattens the Bundles once, resolving their urn:uuid fullUrls
        record = groups.patients.get(patient_ref, [])
        orders: list[dict[str, Any]] = []
        not_evaluated = 0
        medications = groups.medications
        if hook in ORDER_HOOKS:
            orders = draft_medication_requests(context.get("draftOrders"), context.get("selections") if hook == "order-select" else None)
            # One card per risky order: bounded, so that a call with thousands of drafts costs neither seconds of CPU
            # nor a response of tens of megabytes. Those beyond are said to be unchecked (a card and a data gap).
            not_evaluated = max(0, len(orders) - self.max_draft_orders)
            del orders[self.max_draft_orders :]
            if not_evaluated:
                notes.append(f"{not_evaluated} draft order(s) were not evaluated (more than {self.max_draft_orders} in one call)")
            medications.update(draft_medications(context.get("draftOrders")))  # the call's own groups: updated in place
        wanted, unresolvable = unresolved_medications(chain(record, orders), medications)
        if unresolvable:
            notes.append(f"{unresolvable} medicationReference(s) could not be resolved (neither in the request nor a relative Medication reference)")
        if wanted:
            data_path = "fallback"
            async with _paused(turn):
                fetched_medications, medication_notes = await self._fetch_medications(body, wanted)
            medications.update(fetched_medications)
            notes.extend(medication_notes)
        evaluation = evaluate_patient(
            record,
            patient_ref=patient_ref,
            catalog=self.catalog,
            thresholds=self.thresholds,
            now=now,
            medications=medications,
            topic_system=self.topic_system,
            notes=notes,
        )
        cards = self.cards_for(hook, orders, evaluation, medications)
        if not_evaluated:
            cards = [self._not_evaluated_card(evaluation, len(orders), not_evaluated), *cards]
        cards = for_call(cards, body["hookInstance"])
        return HookAnswer({"cards": cards}, service_id, patient_ref, data_path, evaluation, cards, notes)

    def _allowed_server(self, body: dict[str, Any]) -> tuple[str, str | None]:
        """``fhirServer`` and the EHR's access token, when the token may be sent there (:func:`check_fhir_server`);
        else :class:`FetchRefused`."""
        server = body.get("fhirServer")
        if not isinstance(server, str):
            raise FetchRefused("no fhirServer was given")
        check_fhir_server(server, self.allowlist, self.dev_mode)
        return server, (body.get("fhirAuthorization") or {}).get("access_token")

    async def _fetch(self, body: dict[str, Any], context: dict[str, Any], to_fetch: dict[str, str], paged: dict[str, str]) -> tuple[list[Any], list[str]]:
        """The keys the EHR did not send, and the pages after the first of the searchsets it sent paged, from its
        ``fhirServer`` at once: the resources, and value-free notes on what could not be had. A required key that
        cannot be had is :class:`PrefetchUnavailable` (412); a paged key keeps the pages the EHR gave."""
        try:
            server, token = self._allowed_server(body)
        except FetchRefused as exc:
            required_missing = sorted(REQUIRED_KEYS & to_fetch.keys())
            if required_missing:
                raise PrefetchUnavailable(f"{exc}: cannot fetch {', '.join(required_missing)}") from None
            return [], [f"prefetch {k} not provided ({exc})" for k in sorted(to_fetch)] + [
                f"prefetch {k} is paged; the pages after the first were not fetched ({exc})" for k in sorted(paged)
            ]
        queries: dict[str, str] = {}
        for key, template in to_fetch.items():
            query = render_template(template, context)
            if query is None:
                if key in REQUIRED_KEYS:
                    raise PrefetchUnavailable(f"prefetch {key}: template tokens missing from context")
                continue
            queries[key] = query
        missing, rest = await asyncio.gather(self.fetcher.fetch_all(server, token, queries), self.fetcher.fetch_rest(server, token, paged))
        failed = sorted(k for k, r in missing.items() if r.error is not None and k in REQUIRED_KEYS)
        if failed:
            reasons = "; ".join(f"{k}: {missing[k].error}" for k in failed)
            raise PrefetchUnavailable(f"could not fetch from fhirServer ({reasons})")
        resources: list[Any] = []
        notes: list[str] = []
        for results, failed_note, cut_note in (
            (missing, "{} could not be fetched ({}); evaluated without it", "{} was fetched in part ({}); evaluated without the rest"),
            (
                rest,
                "prefetch {} is paged; the pages after the first could not be fetched ({})",
                "prefetch {} is paged; the pages after the first were fetched in part or not at all ({})",
            ),
        ):
            for key, result in results.items():
                if result.error is not None:
                    notes.append(failed_note.format(key, result.error))
                if result.cut is not None:
                    notes.append(cut_note.format(key, result.cut))
                resources.extend(result.resources)
        return resources, notes

    async def _fetch_medications(self, body: dict[str, Any], refs: list[str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """The Medications the call's medication resources reference (``Medication/id``) but did not include, read from
        ``fhirServer`` as a missing prefetch key is (allowlist, https, the EHR's token, timeout), at most
        ``max_medication_reads``; and value-free notes on those that could not be had (never a 412)."""
        try:
            server, token = self._allowed_server(body)
        except FetchRefused as exc:
            return {}, [f"{len(refs)} referenced Medication(s) not in the prefetch were not fetched ({exc})"]
        asked, notes = refs[: self.max_medication_reads], []
        if len(refs) > len(asked):
            notes.append(f"{len(refs) - len(asked)} referenced Medication(s) were not fetched (more than {self.max_medication_reads} in one call)")
        results = await self.fetcher.fetch_all(server, token, {ref: ref for ref in asked})
        found: dict[str, dict[str, Any]] = {}
        failed: dict[str, int] = {}
        for ref, result in results.items():
            medication = next((r for r in result.resources if r.get("resourceType") == "Medication" and resource_ref(r) == ref), None)
            if medication is not None:
                found[ref] = medication
            else:
                reason = result.error or "the server answered another resource"
                failed[reason] = failed.get(reason, 0) + 1
        notes += [f"{n} referenced Medication(s) could not be fetched ({reason}); evaluated without them" for reason, n in sorted(failed.items())]
        return found, notes

    async def _from_stored(self, hook: str, service_id: str, patient_ref: str, now: datetime, hook_instance: str) -> HookAnswer | None:
        """The data cannot be had from the EHR, but background monitoring has a fresh assessment of the patient
        made with the same rules and mappings: answer from it (patient-view/encounter-start only: order checks
        need the draft orders evaluated against current facts)."""
        if self.stored is None or hook in ORDER_HOOKS:
            return None
        stored = await run_in_threadpool(self.stored, patient_ref)
        if (
            stored is None
            or now - stored.evaluated_at > timedelta(seconds=self.stored_fresh_s)
            or stored.rules_version != self.thresholds.rules_version()
            or stored.mappings_version != self.catalog.version
        ):
            return None
        cards = for_call(stored.assessment.get("cards") or [], hook_instance)
        return HookAnswer({"cards": cards}, service_id, patient_ref, "stored", None, cards, ["answered from the stored assessment"])

    def _not_evaluated_card(self, evaluation: Evaluation, evaluated: int, not_evaluated: int) -> dict[str, Any]:
        """The info card of a call with more draft orders than ``max_draft_orders``: the clinician must know that
        the absence of a warning says nothing about the orders past the limit."""
        total = evaluated + not_evaluated
        return make_card(
            evaluation.context,
            topic="medication-order-risk",
            rule_id=RULE_IDS["order"],
            indicator="info",
            summary=f"{not_evaluated} of {total} draft medication orders were not checked for calcification risk",
            body=(
                f"This request held {total} draft medication orders; this service checks at most {evaluated} in one "
                f"request, so the last {not_evaluated} were **not evaluated**. No card about them does not mean they "
                "are safe: sign or select them in smaller groups to have them checked."
            ),
            uuid_parts=("draft-orders-not-evaluated", str(total)),
        )

    def cards_for(self, hook: str, orders: list[dict[str, Any]], evaluation: Evaluation, medications: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """``orders``: the draft MedicationRequests under review (order hooks); ``medications``: what their
        ``medicationReference`` may name."""
        if hook not in ORDER_HOOKS:
            return evaluation.cards
        order_cards = order_risk_cards(orders, evaluation.outcome, evaluation.facts, evaluation.context, self.catalog, medications)
        if hook == "order-select":
            return order_cards
        return [*order_cards, *evaluation.cards]
