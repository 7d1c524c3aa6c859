from twisted.application.service import ServiceMaker

relayd = ServiceMaker("relayd", "relayd.tap", "Durable HTTP-to-Redis relay.", "relayd")
