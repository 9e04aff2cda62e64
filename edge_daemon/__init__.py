"""Edge daemon: the inspection service between cameras and PLC/HMI subscribers."""
