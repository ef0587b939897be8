"""Handlers: registration (refused signatures, overlaps, callables, call middleware) and dispatch
by the annotated type of a handler's first parameter, through a real subscription.

No `from __future__ import annotations` here on purpose: handler annotations in this
module are real objects, except where a test spells out a string annotation.
"""

import functools
import logging
from collections.abc import Callable
from typing import Any

import pytest

from depeche_nb import (
    CallMiddleware,
    HandlerRegistrationError,
    MessageHandler,
    MessageHandlerRegister,
    StoredMessage,
    SubscriptionMessage,
)
from tests import workers
from tests.engine.support import Env, positions, register
from tests.support import Numbered, Renamed

pytestmark = pytest.mark.both_drivers


class SpecialNumbered(Numbered):
    """A subclass of a registered type, for overlap checks (never stored)."""


# -- registration --------------------------------------------------------------------------------


def test_unannotated_first_parameter_is_refused_at_registration() -> None:
    def handler(message) -> None:  # type: ignore[no-untyped-def]
        pass

    with pytest.raises(HandlerRegistrationError, match="annotation") as info:
        MessageHandlerRegister().register(handler)
    assert isinstance(info.value, TypeError)

    class Unannotated(MessageHandler[Numbered]):
        @MessageHandler.register
        def handle(self, message) -> None:  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(HandlerRegistrationError):
        Unannotated()


def test_annotation_that_is_not_a_message_type_is_refused() -> None:
    def takes_int(message: int) -> None:
        pass

    def takes_union_with_str(message: Numbered | str) -> None:
        pass

    def takes_bare_subscription_message(message: SubscriptionMessage) -> None:  # type: ignore[type-arg]
        pass

    for handler in (takes_int, takes_union_with_str, takes_bare_subscription_message):
        handler_register: MessageHandlerRegister[Any] = MessageHandlerRegister()
        with pytest.raises(TypeError):
            handler_register.register(handler)
        assert list(handler_register.get_all_handlers()) == [], "a refused handler must not stay registered"


def test_duplicate_and_overlapping_registrations_are_refused_in_either_order() -> None:
    def on_numbered(message: Numbered) -> None:
        pass

    def on_numbered_again(message: StoredMessage[Numbered]) -> None:
        pass

    def on_special(message: SpecialNumbered) -> None:
        pass

    def on_any(message: Numbered | Renamed) -> None:
        pass

    def on_renamed(message: Renamed) -> None:
        pass

    for first, second in [
        (on_numbered, on_numbered_again),
        (on_numbered, on_special),  # subclass after base
        (on_special, on_numbered),  # base after subclass
        (on_any, on_renamed),  # member of a registered union
        (on_renamed, on_any),
    ]:
        handler_register = register(first)
        with pytest.raises(ValueError, match="overlap"):
            handler_register.register(second)
        assert [d.handler for d in handler_register.get_all_handlers()] == [first]

    class Twice(MessageHandler[Numbered]):
        @MessageHandler.register
        def one(self, message: Numbered) -> None:
            pass

        @MessageHandler.register
        def two(self, message: SubscriptionMessage[SpecialNumbered]) -> None:
            pass

    with pytest.raises(ValueError):
        Twice()


def test_callable_objects_and_partials_can_be_registered(env: Env) -> None:
    """Depeche DB reads the first parameter from inspect.signature(), which also works for
    callable instances and functools.partial; typing.get_type_hints() alone does not."""

    class CallableHandler:
        def __init__(self) -> None:
            self.numbers: list[int] = []

        def __call__(self, message: Numbered) -> None:
            self.numbers.append(message.number)

    def with_prefix(prefix: str, message: Renamed) -> None:
        seen_names.append(prefix + message.name)

    seen_names: list[str] = []
    callable_handler = CallableHandler()
    handler_register = register(callable_handler, functools.partial(with_prefix, "x-"))
    assert handler_register.get_handler(Numbered) is not None
    env.write(0, Numbered(number=5), Renamed(name="n"))
    env.project()
    env.subscription(handler_register).runner.run()
    assert callable_handler.numbers == [5]
    assert seen_names == ["x-n"]


def test_extra_parameters_need_a_call_middleware(env: Env) -> None:
    def needs_dependency(message: Numbered, sink: list[int]) -> None:
        sink.append(message.number)

    with pytest.raises(ValueError, match="call_middleware"):
        env.subscription(register(needs_dependency))

    class ClassBased(MessageHandler[Numbered]):
        @MessageHandler.register
        def handle(self, message: Numbered, sink: list[int]) -> None:
            sink.append(message.number)

    with pytest.raises(ValueError, match="call_middleware"):
        env.subscription(ClassBased())


def test_call_middleware_injects_a_dependency(env: Env) -> None:
    sink: list[tuple[int, str]] = []

    class Inject(CallMiddleware[Any]):
        def __init__(self, dependency: list[tuple[int, str]]) -> None:
            self.dependency = dependency

        def call(self, handler: Callable[..., Any], message: Any) -> Any:
            return handler(message, self.dependency)

    def handle(message: Numbered, sink: list[tuple[int, str]]) -> None:
        sink.append((message.number, type(message).__name__))

    subscription = env.subscription(register(handle), call_middleware=Inject(sink))
    env.numbers(0, range(4))
    env.project()
    subscription.runner.run()
    assert sink == [(0, "Numbered"), (1, "Numbered"), (2, "Numbered"), (3, "Numbered")]


# -- dispatch ------------------------------------------------------------------------------------


def test_dispatch_on_plain_union_stored_and_subscription_message_types(env: Env) -> None:
    received: dict[str, list[Any]] = {"plain": [], "union": [], "stored": [], "subscription": []}

    def plain(message: Numbered) -> None:
        received["plain"].append(message)

    def union(message: Numbered | Renamed) -> None:
        received["union"].append(message)

    def stored(message: StoredMessage[Numbered]) -> None:
        received["stored"].append(message)

    def wrapped(message: SubscriptionMessage[Renamed]) -> None:
        received["subscription"].append(message)

    env.write(0, Numbered(number=1), Renamed(name="a"), Numbered(number=2))
    env.project()

    env.subscription(register(plain), suffix="plain").runner.run()
    assert [type(m) for m in received["plain"]] == [Numbered, Numbered]
    assert [m.number for m in received["plain"]] == [1, 2]

    env.subscription(register(union), suffix="union").runner.run()
    assert [type(m) for m in received["union"]] == [Numbered, Renamed, Numbered]

    env.subscription(register(stored, wrapped), suffix="both").runner.run()
    assert all(isinstance(m, StoredMessage) for m in received["stored"])
    assert [(m.version, m.message.number) for m in received["stored"]] == [(1, 1), (3, 2)]
    [renamed] = received["subscription"]
    assert isinstance(renamed, SubscriptionMessage)
    assert (renamed.partition, renamed.position, renamed.stored_message.message.name) == (0, 1, "a")
    assert isinstance(renamed.stored_message, StoredMessage)
    assert callable(renamed.ack.execute)


def test_string_annotations_are_resolved(env: Env) -> None:
    got: list[Any] = []

    def quoted(message: "SubscriptionMessage[Numbered]") -> None:
        got.append(message)

    def quoted_union(message: "Numbered | Renamed") -> None:
        got.append(message)

    assert isinstance(workers.FutureAnnotatedHandlers.on_numbered.__annotations__["message"], str)
    env.write(0, Numbered(number=7), Renamed(name="r"))
    env.project()

    env.subscription(register(quoted), suffix="quoted").runner.run()
    assert [type(m) for m in got] == [SubscriptionMessage]
    assert got[0].stored_message.message.number == 7

    got.clear()
    env.subscription(register(quoted_union), suffix="qunion").runner.run()
    assert [type(m) for m in got] == [Numbered, Renamed]

    handlers = workers.FutureAnnotatedHandlers()
    env.subscription(handlers, suffix="future").runner.run()
    assert [type(m) for m in handlers.received] == [SubscriptionMessage, StoredMessage]
    assert handlers.received[1].message.name == "r"


def test_message_without_handler_is_acked_and_reported(env: Env) -> None:
    calls: list[int] = []

    def only_numbered(message: Numbered) -> None:
        calls.append(message.number)

    renamed = Renamed(name="nobody handles me")
    env.write(1, Numbered(number=1), renamed, Numbered(number=2))
    env.project()
    subscription = env.subscription(register(only_numbered))
    report = subscription.runner.step()
    assert calls == [1, 2]
    assert [(h.position, h.message_type, h.outcome) for h in report.handled] == [
        (0, "Numbered", "handled"),
        (1, "Renamed", "no handler"),
        (2, "Numbered", "handled"),
    ]
    assert report.handled[1].message_id == renamed.message_id
    assert positions(subscription)[1] == 2, "a message without a handler must still be acknowledged"
    assert len(subscription.runner.step()) == 0


def test_messages_without_a_handler_are_said_once_per_type(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """Acknowledged without a handler means skipped for good: the report words it, and the
    log says it once per message type (a worker's log; a notebook cell's stderr)."""

    def only_numbered(message: Numbered) -> None:
        return None

    env.write(1, Numbered(number=1), Renamed(name="a"), Renamed(name="b"), Numbered(number=2))
    env.project()
    subscription = env.subscription(register(only_numbered))
    caplog.set_level(logging.WARNING, logger=f"depeche_nb.subscription.{subscription.name}")
    report = subscription.runner.step(max_messages=3)
    assert report.counts() == {"handled": 1, "no handler": 2}
    assert report.without_handler() == {"Renamed": 2}
    assert repr(report) == (
        f"<RunnerReport {subscription.name}: 1 handled, 2 acknowledged without a handler (Renamed ×2)>"
    )
    warnings = [r for r in caplog.records if r.name == f"depeche_nb.subscription.{subscription.name}"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert warnings[0].getMessage() == (
        f"subscription {subscription.name!r} has no handler for Renamed: its messages are "
        "acknowledged unhandled, skipped for good (the first at partition 1, position 1); register "
        "a handler for Renamed if this subscription should see them (logged once per message type)"
    )

    env.write(1, Renamed(name="c"))
    env.project()
    assert subscription.runner.step().counts() == {"handled": 1, "no handler": 1}
    assert len([r for r in caplog.records if r.name == warnings[0].name]) == 1  # once per type


def test_class_handler_that_forgets_super_init_still_dispatches(env: Env) -> None:
    class NoSuper(MessageHandler[Numbered]):
        def __init__(self) -> None:
            self.numbers: list[int] = []

        @MessageHandler.register
        def handle(self, message: Numbered) -> None:
            self.numbers.append(message.number)

    handlers = NoSuper()
    env.numbers(0, range(3))
    env.project()
    env.subscription(handlers).runner.run()
    assert handlers.numbers == [0, 1, 2]
