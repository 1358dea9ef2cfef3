from accel._info import info

info()
