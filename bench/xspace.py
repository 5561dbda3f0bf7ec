"""Thread time per event name from a TensorFlow profiler trace (the XSpace protobuf under a profiler logdir); shared
by profile_step.py (XLA thunks) and e2e_parts.py (TF graph ops)."""
import collections
import glob
import os


def event_seconds(logdir, key):
    """{key(event name): thread-seconds} over every plane and line of the newest trace under ``logdir``; ``key``
    returns the name to count under, or None to skip the event."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(os.path.join(logdir, "plugins/profile/*/*.xplane.pb")))[-1], "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = key(names.get(event.metadata_id, ""))
                if name is not None:
                    totals[name] += event.duration_ps / 1e12
    return totals
