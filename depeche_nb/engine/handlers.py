"""Handler registration and dispatch by the annotated type of a handler's first parameter."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from depeche_nb.core.errors import (
    HandlerOverlapError,
    HandlerSignatureError,
    HandlerTypeError,
)
from depeche_nb.core.interfaces import (
    CallMiddleware,
    ErrorAction,
    HandlerDescriptor,
    MessageHandlerRegisterProtocol,
    SubscriptionErrorHandler,
    SubscriptionMessage,
)
from depeche_nb.core.messages import StoredMessage, UnreadableMessage, redefines

E = TypeVar("E")
H = TypeVar("H", bound=Callable[..., Any])


def _union_members(annotation: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        members: list[Any] = []
        for arg in typing.get_args(annotation):
            members.extend(_union_members(arg))
        return tuple(members)
    return (annotation,)


def _is_message_class(candidate: Any) -> bool:
    return isinstance(candidate, type) and all(
        callable(getattr(candidate, name, None)) for name in ("get_message_id", "get_message_time")
    )


def _first_parameter_type(handler: Callable[..., Any]) -> tuple[Any, bool]:
    """The annotation of the first parameter (string annotations resolved) and whether more follow."""
    name = getattr(handler, "__qualname__", repr(handler))
    try:
        # eval_str resolves `from __future__ import annotations` strings, and
        # signature() also understands callable objects and partials.
        signature = inspect.signature(handler, eval_str=True)
    except (NameError, SyntaxError) as exc:
        raise HandlerTypeError(f"cannot resolve the annotations of handler {name}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise HandlerTypeError(f"cannot inspect handler {handler!r}: {exc}") from exc
    parameters = [p for p in signature.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not parameters:
        raise HandlerSignatureError(f"handler {name} must take the message as its first parameter")
    first = parameters[0]
    annotation = first.annotation
    if annotation is inspect.Parameter.empty:
        raise HandlerTypeError(
            f"the first parameter {first.name!r} of handler {name} has no type annotation; annotate "
            "it with the message type, a Union of types, StoredMessage[T] or SubscriptionMessage[T]"
        )
    return annotation, len(parameters) > 1


class MessageHandlerRegister(Generic[E]):
    """Maps message types to handlers; overlapping registrations are refused."""

    def __init__(self) -> None:
        self._handlers: dict[type[Any], HandlerDescriptor[E]] = {}
        self._cache: dict[type[Any], HandlerDescriptor[E] | None] = {}

    def register(self, handler: H) -> H:
        annotation, more_parameters = _first_parameter_type(handler)
        self.register_manual(handler, annotation, requires_middleware=more_parameters)
        return handler

    def register_manual(self, handler: H, handled_type: Any, requires_middleware: bool = False) -> H:
        pass_subscription_message = pass_stored_message = False
        origin = typing.get_origin(handled_type)
        if origin is SubscriptionMessage or handled_type is SubscriptionMessage:
            pass_subscription_message = True
        elif origin is StoredMessage or handled_type is StoredMessage:
            pass_stored_message = True
        if pass_subscription_message or pass_stored_message:
            args = typing.get_args(handled_type)
            if not args:
                raise HandlerTypeError(
                    f"{handled_type!r} needs a message type parameter, e.g. SubscriptionMessage[MyEvent]"
                )
            handled_type = args[0]
        members = _union_members(handled_type)
        for member in members:
            if not _is_message_class(member):
                raise HandlerTypeError(
                    f"{member!r} is not a message type (a class with get_message_id() and get_message_time())"
                )
        descriptor: HandlerDescriptor[E] = HandlerDescriptor(
            handler=handler,
            pass_subscription_message=pass_subscription_message,
            pass_stored_message=pass_stored_message,
            requires_middleware=requires_middleware,
        )
        self.assert_not_registered(handled_type)
        for member in members:
            self._handlers[member] = descriptor
        self._cache.clear()
        return handler

    def assert_not_registered(self, handled_type: Any) -> None:
        """Raise `HandlerOverlapError` (a `ValueError`) if a registered handler already covers
        `handled_type` or one of its union members: the same type, a base or a subclass."""
        for member in _union_members(handled_type):
            if not isinstance(member, type):
                continue
            for registered, existing in self._handlers.items():
                if issubclass(member, registered) or issubclass(registered, member):
                    raise HandlerOverlapError(
                        f"a handler for {member.__name__} would overlap the handler "
                        f"{getattr(existing.handler, '__qualname__', existing.handler)!r} already "
                        f"registered for {registered.__name__}; one message type, one handler"
                    )

    def get_handler(self, message_type: type[E]) -> HandlerDescriptor[E] | None:
        if message_type in self._cache:
            return self._cache[message_type]
        found: HandlerDescriptor[E] | None = self._handlers.get(message_type)
        if found is None and isinstance(message_type, type):
            for registered, descriptor in self._handlers.items():
                if issubclass(message_type, registered):
                    found = descriptor
                    break
        if found is None and isinstance(message_type, type):
            # A class defined again by a re-run notebook cell, on either side: messages
            # read as the old class, or handlers registered for the old one.
            for registered, descriptor in self._handlers.items():
                if redefines(message_type, registered):
                    found = descriptor
                    break
        self._cache[message_type] = found
        return found

    def get_all_handlers(self) -> Iterator[HandlerDescriptor[E]]:
        seen: set[int] = set()
        for descriptor in self._handlers.values():
            if id(descriptor) not in seen:
                seen.add(id(descriptor))
                yield descriptor


class MessageHandler(Generic[E]):
    """Class-based handlers: decorate methods with `@MessageHandler.register`."""

    _MARK = "__depeche_message_handler__"

    def __init__(self) -> None:
        self._register: MessageHandlerRegister[E] = MessageHandlerRegister()
        for name in dir(type(self)):
            function = getattr(type(self), name, None)
            if callable(function) and getattr(function, self._MARK, False):
                self._register.register(getattr(self, name))

    @staticmethod
    def register(handler: H) -> H:
        setattr(handler, MessageHandler._MARK, True)
        return handler

    def _registry(self) -> MessageHandlerRegister[E]:
        # Subclasses that forget super().__init__() still get their handlers.
        if "_register" not in self.__dict__:
            MessageHandler.__init__(self)
        return self._register

    def get_handler(self, message_type: type[E]) -> HandlerDescriptor[E] | None:
        return self._registry().get_handler(message_type)

    def get_all_handlers(self) -> Iterator[HandlerDescriptor[E]]:
        return self._registry().get_all_handlers()


class ExitSubscriptionErrorHandler(SubscriptionErrorHandler[E]):
    """Stop on the first handler error: the message stays un-acked and comes again."""

    def handle_error(self, error: Exception, message: SubscriptionMessage[E]) -> ErrorAction:
        return ErrorAction.EXIT


# Outcomes reported per handled message.
HANDLED = "handled"
NO_HANDLER = "no handler"
IGNORED = "ignored after error"
PARKED = "parked"


class SubscriptionMessageHandler(Generic[E]):
    """Finds the handler for a message, calls it (through middleware) and applies error policy."""

    def __init__(
        self,
        handler_register: MessageHandlerRegisterProtocol[E],
        error_handler: SubscriptionErrorHandler[E] | None = None,
        call_middleware: CallMiddleware[E] | None = None,
    ) -> None:
        self.handler_register = handler_register
        self.error_handler: SubscriptionErrorHandler[E] = error_handler or ExitSubscriptionErrorHandler()
        self.call_middleware = call_middleware
        for descriptor in handler_register.get_all_handlers():
            if descriptor.requires_middleware and call_middleware is None:
                raise ValueError(
                    f"handler {getattr(descriptor.handler, '__qualname__', descriptor.handler)!r} "
                    "has more than one parameter, so a call_middleware must be given to fill them"
                )

    def call(self, message: SubscriptionMessage[E]) -> str:
        """Run the handler once; raises what it raises. Returns HANDLED or NO_HANDLER."""
        payload = message.stored_message.message
        if isinstance(payload, UnreadableMessage):
            raise payload.error
        descriptor = self.handler_register.get_handler(type(payload))
        if descriptor is None:
            return NO_HANDLER
        argument = descriptor.adapt_message_type(message)
        if self.call_middleware is not None:
            self.call_middleware.call(descriptor.handler, argument)
        else:
            descriptor.handler(argument)
        return HANDLED

    def handle(self, message: SubscriptionMessage[E]) -> str:
        """Depeche DB's entry point: call, and on error ask the error handler (EXIT re-raises)."""
        try:
            return self.call(message)
        except Exception as error:
            if self.error_handler.handle_error(error, message) is ErrorAction.EXIT:
                raise
            return IGNORED
