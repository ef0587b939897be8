"""depeche-nb: build and explore event-sourced systems on PostgreSQL, cell by cell.

The public names follow Depeche DB's API, so `import depeche_nb as depeche_db`
style code keeps working; `connect()` adds the zero-setup embedded database.
"""

from depeche_nb.core.errors import (
    AckRolledback,
    BatchAckError,
    CheckpointClusterError,
    DefinitionChangedError,
    DepecheError,
    DuplicateMessageIdError,
    EmbeddedServerError,
    HandlerOverlapError,
    HandlerRegistrationError,
    HandlerSignatureError,
    HandlerTypeError,
    InvalidIdentifierError,
    MessageIdMismatchError,
    MessageNotFound,
    MessageSerializationError,
    MissingMessageTypeError,
    NameInUseError,
    OptimisticConcurrencyError,
    PartitionLostError,
    RebuildInProgressError,
    ReplayInProgressError,
    UnknownMessageTypeError,
    UnsupportedServerError,
)
from depeche_nb.core.interfaces import (
    AggregatedStreamMessage,
    CallMiddleware,
    ErrorAction,
    FixedTimeBudget,
    HandlerDescriptor,
    LockProvider,
    MessageHandlerRegisterProtocol,
    MessagePartitioner,
    RunOnNotification,
    RunOnNotificationResult,
    StreamPartitionStatistic,
    SubscriptionErrorHandler,
    SubscriptionMessage,
    SubscriptionMessageBatch,
    SubscriptionStartPoint,
    SubscriptionState,
    SubscriptionStateProvider,
    TimeBudget,
)
from depeche_nb.core.messages import (
    MessagePosition,
    MessageProtocol,
    MessageSerializer,
    StoredMessage,
)
from depeche_nb.engine.aggregated_stream import AggregatedStream, AggregatedStreamFactory
from depeche_nb.engine.depeche_db_adoption import AdoptionError, AdoptionReport, adopt_depeche_db
from depeche_nb.engine.error_handlers import (
    LogAndIgnoreSubscriptionErrorHandler,
    ParkSubscriptionErrorHandler,
    RetryPolicy,
)
from depeche_nb.engine.handlers import (
    ExitSubscriptionErrorHandler,
    MessageHandler,
    MessageHandlerRegister,
    SubscriptionMessageHandler,
)
from depeche_nb.engine.message_store import MessageStore
from depeche_nb.engine.projector import PartitionerError, ProjectionReport, StreamProjector
from depeche_nb.engine.reader import AggregatedStreamReader, AsyncAggregatedStreamReader
from depeche_nb.engine.runner import BatchedAckSubscriptionRunner, RunnerReport, SubscriptionRunner
from depeche_nb.engine.start_points import StartAtBeginning, StartAtNextMessage, StartAtPointInTime
from depeche_nb.engine.subscription import (
    AckStrategy,
    PartitionProgress,
    Subscription,
    SubscriptionFactory,
)
from depeche_nb.engine.trace import MessageTrace

# Importing the notebook package also registers the HTML reprs of the objects
# above; it loads pandas/ipywidgets/IPython only when a view is used.
from depeche_nb.notebook.depeche_db_explorer import DepecheDbExplorer, open_depeche_db
from depeche_nb.notebook.views import (
    assignments_dataframe,
    messages_dataframe,
    partitions_dataframe,
    streams_dataframe,
    subscription_state_dataframe,
)
from depeche_nb.postgres.connection import connect
from depeche_nb.store.protocols import MessageStoreProtocol, MessageStoreReaderProtocol
from depeche_nb.store.reading import MessageStoreReader
from depeche_nb.store.storage import Storage

__version__ = "0.1.0"


_WIDGET_NAMES = (
    "PartitionMap",
    "StreamBrowser",
    "SubscriptionStepper",
    "plot_partition_sizes",
    "plot_subscription_lag",
)


def __getattr__(name: str) -> object:
    # The executor pulls in the listener thread machinery; load it on first use.
    if name == "Executor":
        from depeche_nb.engine.executor import Executor

        return Executor
    # Widgets pull in ipywidgets; a headless worker never pays for them.
    if name == "widgets":
        import importlib

        return importlib.import_module("depeche_nb.widgets")
    if name in _WIDGET_NAMES:
        from depeche_nb import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'depeche_nb' has no attribute {name!r}")


__all__ = [
    "AckRolledback",
    "AckStrategy",
    "AdoptionError",
    "AdoptionReport",
    "AggregatedStream",
    "AggregatedStreamFactory",
    "AggregatedStreamMessage",
    "AggregatedStreamReader",
    "AsyncAggregatedStreamReader",
    "BatchAckError",
    "BatchedAckSubscriptionRunner",
    "CallMiddleware",
    "CheckpointClusterError",
    "DefinitionChangedError",
    "DepecheDbExplorer",
    "DepecheError",
    "DuplicateMessageIdError",
    "EmbeddedServerError",
    "ErrorAction",
    "Executor",
    "ExitSubscriptionErrorHandler",
    "FixedTimeBudget",
    "HandlerDescriptor",
    "HandlerOverlapError",
    "HandlerRegistrationError",
    "HandlerSignatureError",
    "HandlerTypeError",
    "InvalidIdentifierError",
    "LockProvider",
    "LogAndIgnoreSubscriptionErrorHandler",
    "MessageHandler",
    "MessageHandlerRegister",
    "MessageHandlerRegisterProtocol",
    "MessageIdMismatchError",
    "MessageNotFound",
    "MessagePartitioner",
    "MessagePosition",
    "MessageProtocol",
    "MessageSerializationError",
    "MessageSerializer",
    "MessageStore",
    "MessageStoreProtocol",
    "MessageStoreReader",
    "MessageStoreReaderProtocol",
    "MessageTrace",
    "MissingMessageTypeError",
    "NameInUseError",
    "OptimisticConcurrencyError",
    "ParkSubscriptionErrorHandler",
    "PartitionLostError",
    "PartitionProgress",
    "PartitionerError",
    "ProjectionReport",
    "RebuildInProgressError",
    "ReplayInProgressError",
    "RetryPolicy",
    "RunOnNotification",
    "RunOnNotificationResult",
    "RunnerReport",
    "StartAtBeginning",
    "StartAtNextMessage",
    "StartAtPointInTime",
    "Storage",
    "StoredMessage",
    "StreamPartitionStatistic",
    "StreamProjector",
    "Subscription",
    "SubscriptionErrorHandler",
    "SubscriptionFactory",
    "SubscriptionMessage",
    "SubscriptionMessageBatch",
    "SubscriptionMessageHandler",
    "SubscriptionRunner",
    "SubscriptionStartPoint",
    "SubscriptionState",
    "SubscriptionStateProvider",
    "TimeBudget",
    "UnknownMessageTypeError",
    "UnsupportedServerError",
    "adopt_depeche_db",
    "assignments_dataframe",
    "connect",
    "messages_dataframe",
    "open_depeche_db",
    "partitions_dataframe",
    "streams_dataframe",
    "subscription_state_dataframe",
]
