"""Pipelined appends to a Redis store: the relay graph sends a step's append without waiting
for the server and reads the reply before the trajectory's next write (so no step waits for
a round trip). Safe because the stream id is explicit: an append is exactly-once whether or
not its first reply was read."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from relaygraph.trajectory.models import Segment

if TYPE_CHECKING:
    from relaygraph.trajectory.redis_store import RedisStore


def send_append(store: RedisStore, trajectory_id: str, seq: int, segment: Segment
                ) -> Callable[[], None]:
    """:meth:`RedisStore.append` pipelined: the command is sent now, and its reply is read when the
    returned ``confirm()`` is called (which raises what :meth:`append` would). The
    caller does not wait for the server in between: a graph confirms a step's append
    when the next one comes, by then long answered.

    Safe because the position is explicit: an append that landed is never doubled, and
    one whose reply is lost (a dropped connection) is sent again through ``store.append``
    with its retries, where a copy that had landed reads as a duplicate. A Cluster or
    Sentinel store appends at once (``confirm()`` then does nothing). A ``confirm()``
    called again after it raised appends again (a "dup" if the first copy landed)."""
    if seq < 0:
        raise ValueError(f"position must be >= 0, got {seq}")
    data = segment.model_dump_json()
    if store.kind != "single":
        store.append(trajectory_id, seq, segment)
        return _confirmed
    keys = store._keys(trajectory_id)
    pool = store.client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_command("EVALSHA", store._append.sha, len(keys), *keys, seq, data)
    except (redis.ConnectionError, redis.TimeoutError):
        pool.release(conn)  # redis-py disconnected it: the pool reconnects it on use
        store.append(trajectory_id, seq, segment)
        return _confirmed
    except BaseException:
        pool.release(conn)
        raise

    read = False

    def confirm() -> None:
        nonlocal read
        if read:  # called again after it raised: append again (exactly-once by its id)
            store.append(trajectory_id, seq, segment)
            return
        read = True  # the connection is released below, whatever happens
        try:
            reply = conn.read_response()
        except redis.exceptions.NoScriptError:  # the first use, or a restarted server
            pool.release(conn)
            store.append(trajectory_id, seq, segment)  # loads the script
            return
        except redis.ResponseError:
            pool.release(conn)
            raise
        except (redis.ConnectionError, redis.TimeoutError):
            conn.disconnect()
            pool.release(conn)
            store.append(trajectory_id, seq, segment)  # "dup" if the first copy landed
            return
        except BaseException:
            conn.disconnect()  # a reply may still be on its way: never reuse it
            pool.release(conn)
            raise
        pool.release(conn)
        store._appended(trajectory_id, seq, reply, segment)

    return confirm



def _confirmed() -> None:
    """The confirmation of an append that was made at once."""
