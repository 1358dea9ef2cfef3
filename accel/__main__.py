from accel.info import info

info()
